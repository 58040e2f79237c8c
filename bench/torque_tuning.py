"""Choose prune --method torque's defaults on validation text: one training per setting
(strength and learning rate) and size, pruned uniformly, against activation pruning (the same
importance with no training) at the same sizes. Calibration is pydoc; the choice reads the
validation splits of pydoc and of the news corpus (text the training never saw: a fine-tune on
pydoc can win pydoc and lose everything else), never a test split. Writes
OUT/torque_tuning[_MODEL].json.

    python bench/torque_tuning.py                 # ~25 min on 2 cores
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions

from common import save_and_print

HERE = Path(__file__).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sizes", default="0.9")
    parser.add_argument("--settings", default="0.5:1e-5,1:1e-5,2:1e-5,1:0,1:1e-4", help="strength:lr pairs")
    parser.add_argument("--no-activation", action="store_true", help="leave out the activation row")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4, help="512-token validation windows")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    base, tokenizer = hfc.load_model(args.model)
    splits = {"validation": hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="validation")
              [-args.windows:],
              "news validation": hfc.calibration_data(tokenizer, "builtin:news", seq_len=512, split="validation",
                                                      max_windows=args.windows)}
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len, max_windows=4 * args.steps)

    def measure(model) -> dict:
        return {name: round(perplexity(model, windows)["perplexity"], 3) for name, windows in splits.items()}

    results = {"protocol": {"model": args.model, "steps": args.steps, "batch_size": 4, "seq_len": args.seq_len,
                            "calibration": f"builtin:pydoc, {len(data)} windows", "windows_of_512": args.windows},
               "versions": versions(), "dense": measure(base), "runs": {}}
    settings = [("activation (no training)", {})] * (not args.no_activation) + [
        (f"torque strength {s}, lr {lr}", dict(method="torque", strength=float(s), lr=float(lr), max_steps=args.steps))
        for s, lr in (pair.split(":") for pair in args.settings.split(","))]
    for name, extra in settings:
        results["runs"][name] = {}
        for size in sizes:
            start = time.perf_counter()
            model = hfc.prune(copy.deepcopy(base), data, ratio=size, show_progress=False, **extra)
            cell = {"seconds": round(time.perf_counter() - start, 1)} | measure(model)
            cell["score"] = round(math.exp((math.log(cell["validation"]) + math.log(cell["news validation"])) / 2), 3)
            results["runs"][name][str(size)] = cell
            print(name, size, cell, flush=True)

    columns = [f"{s} (pydoc / news validation; geometric mean)" for s in sizes] + ["seconds"]
    rows = {name: [f"{cells[str(s)]['validation']:.1f} / {cells[str(s)]['news validation']:.1f}; "
                   f"**{cells[str(s)]['score']:.1f}**" for s in sizes]
            + [f"{cells[str(sizes[0])]['seconds']:.0f}"] for name, cells in results["runs"].items()}
    suffix = "" if args.model == "demo" else "_" + args.model.split(":")[-1]
    save_and_print(args.out, f"torque_tuning{suffix}", results, columns, rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
