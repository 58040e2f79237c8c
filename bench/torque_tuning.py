"""Choose prune --method torque's defaults on validation text: one training per setting
(strength and learning rate), pruned uniformly at each size from that one run, against activation
pruning (the same importance with no training) at the same sizes. The pydoc validation split
decides; the news corpus (out of domain) is shown beside it; the test split is never read.
Writes OUT/torque_tuning[_MODEL].json.

    python bench/torque_tuning.py --steps 40 --seq-len 128    # ~40 min on 2 cores
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions

from _report import save_and_print
from quantize_demo import perplexity_splits

HERE = Path(__file__).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sizes", default="0.9,0.8")
    parser.add_argument("--settings", default="2:1e-4,4:1e-4,8:1e-4,4:1e-5", help="strength:lr pairs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4, help="512-token validation windows")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    base, tokenizer = hfc.load_model(args.model)
    splits = perplexity_splits(tokenizer, 0, args.windows, args.windows)
    splits.pop("test")  # tuning never reads the test split
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len, max_windows=4 * args.steps)

    def measure(model) -> dict:
        return {name: round(perplexity(model, windows)["perplexity"], 3) for name, windows in splits.items()}

    results = {"protocol": {"model": args.model, "steps": args.steps, "batch_size": 4, "seq_len": args.seq_len,
                            "calibration": f"builtin:pydoc, {len(data)} windows", "windows_of_512": args.windows},
               "versions": versions(), "dense": measure(base), "runs": {}}
    settings = [("activation (no training)", {})] + [
        (f"torque strength {s}, lr {lr}", dict(method="torque", strength=float(s), lr=float(lr), max_steps=args.steps))
        for s, lr in (pair.split(":") for pair in args.settings.split(","))]
    for name, extra in settings:
        results["runs"][name] = {}
        with tempfile.TemporaryDirectory() as run:  # one training serves every size
            for size in sizes:
                start = time.perf_counter()
                model = hfc.prune(copy.deepcopy(base), data, ratio=size, progress_dir=run, show_progress=False,
                                  **extra)
                results["runs"][name][str(size)] = {"seconds": round(time.perf_counter() - start, 1)} | measure(model)
                print(name, size, results["runs"][name][str(size)], flush=True)

    columns = [f"{s} (validation / news)" for s in sizes] + ["seconds (training + first size)"]
    rows = {name: [f"{cells[str(s)]['validation']:.1f} / {cells[str(s)]['out-of-domain']:.1f}" for s in sizes]
            + [f"{cells[str(sizes[0])]['seconds']:.0f}"] for name, cells in results["runs"].items()}
    suffix = "" if args.model == "demo" else "_" + args.model.split(":")[-1]
    save_and_print(args.out, f"torque_tuning{suffix}", results, columns, rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
