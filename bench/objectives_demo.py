"""Every pruning objective of the pass on the demo model, one seed: held-out perplexity of the
sizes each pass ranks, and its wall time against the default `saliency` pass.

Each objective runs one pass with the same data, budget and defaults (no tuning per objective:
these are the defaults as shipped, chosen so that every objective reaches the stop ratio within
the budget). Perplexity windows (512 tokens) as in bench/quantize_demo.py: test = the first 8 of
the builtin held-out split, validation = its last 4, out-of-domain = 4 windows of the GPL-3
text Debian ships. Writes OUT/objectives_demo.json and prints the Markdown table.

    python bench/objectives_demo.py                    # 5 passes of 60 steps: ~35 min on 2 cores
    python bench/objectives_demo.py --quick --out DIR  # a reduced run, so that CI keeps it alive
"""

import argparse
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.acip.config import OBJECTIVES
from hf_compress.evaluate import perplexity, versions

from _report import save_and_print
from quantize_demo import perplexity_splits

HERE = Path(__file__).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.9,0.8,0.6,0.4")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few steps and windows")
    args = parser.parse_args()
    windows = dict(test=8, validation=4, ood=4)
    if args.quick:
        args.steps, args.ratios, windows = 4, "0.6", dict(test=1, validation=1, ood=1)
    ratios = [float(r) for r in args.ratios.split(",")]

    _, tokenizer = hfc.load_model("demo")
    splits = perplexity_splits(tokenizer, windows["test"], windows["validation"], windows["ood"])
    data = hfc.calibration_data(tokenizer, "builtin", seq_len=args.seq_len)

    results = {"protocol": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": 4, "seed": 0,
                            "windows": {k: len(v) for k, v in splits.items()}},
               "versions": versions(), "objectives": {}}
    for objective in args.objectives.split(","):
        model, _ = hfc.load_model("demo")
        torch.manual_seed(0)
        start = time.perf_counter()
        cm = hfc.acip(model, data, objective=objective, max_steps=args.steps, stop_ratio=0.4, batch_size=4)
        seconds = time.perf_counter() - start
        record = {"pass_seconds": round(seconds, 1), "steps": cm.summary["steps"],
                  "final_ratio": round(cm.summary["final_ratio"], 4), "sizes": {}}
        for ratio in ratios:
            small = cm.materialize(ratio)
            record["sizes"][str(ratio)] = {split: round(perplexity(small, w)["perplexity"], 3)
                                           for split, w in splits.items()}
        results["objectives"][objective] = record
        print(objective, record, flush=True)

    base = results["objectives"].get("saliency", {}).get("pass_seconds")
    rows = {}
    for objective, record in results["objectives"].items():
        cells = [" / ".join(f"{record['sizes'][str(r)][s]:.1f}" for s in splits) for r in ratios]
        relative = f"{record['pass_seconds'] / base:.2f}x" if base else "-"
        rows[objective] = cells + [f"{record['steps']} ({record['final_ratio']:.2f})", relative]
    save_and_print(args.out, "objectives_demo", results,
                   [f"{r} ({' / '.join(splits)})" for r in ratios] + ["steps (final ratio)", "pass time"], rows)


if __name__ == "__main__":
    main()
