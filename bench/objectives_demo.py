"""Every pruning objective of the pass against the baselines on the demo model (or --model): one
script, one run, same data.

Rows: the dense model; whitened SVD with every layer cut to the same ratio (uniform); whitened
SVD with the per-layer ranks the default pass allocates (so the allocation is measured apart from
the values it keeps); every objective with its shipped defaults, without and with LoRA; the
default and `acip` over --seeds seeds (mean and spread); and one README-size pass of the default
(--readme-steps). Every pass has the same calibration windows and budget. Perplexity windows
(512 tokens, bench/common.py): test = the first --test-windows of the pydoc test split,
validation = the last --val-windows of its validation split (the default objective is chosen on
these), out-of-domain = --ood-windows of the news corpus (in no calibration set). Pass time is
relative to the default pass of seed 0. Writes OUT/objectives_demo.json, prints the Markdown.

    python bench/objectives_demo.py                    # ~85 min on 2 cores
    python bench/objectives_demo.py --quick --out DIR  # a reduced run, so that CI keeps it alive
    python bench/objectives_demo.py --model demo:gemma3 --objectives saliency,acip,nuclear \
        --lora-rank 0 --seeds 1 --readme-steps 0 --ratios 0.9,0.8,0.6 --out bench/results/gemma3
"""

import argparse
import math
import statistics
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.acip.config import OBJECTIVES
from hf_compress.acip.train import svd_compressible
from hf_compress.evaluate import perplexity, versions

from common import measure, perplexity_splits, run_pass, save_and_print

HERE = Path(__file__).parent
DEFAULT = hfc.AcipConfig().objective


def spread(records: list[dict], ratio: str, split: str) -> str:
    values = [r["sizes"][ratio][split] for r in records]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or demo:gemma3 for the second family")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=8, help="the LoRA rows' rank (0: no LoRA rows)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the default objective and of acip")
    parser.add_argument("--readme-steps", type=int, default=60, help="the README's pass of the default (0: skip)")
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5,0.4")
    parser.add_argument("--calibration", default="builtin:pydoc", help="calibration source of every pass and baseline")
    parser.add_argument("--test-windows", type=int, default=4)
    parser.add_argument("--val-windows", type=int, default=4)
    parser.add_argument("--ood-windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few steps and windows")
    args = parser.parse_args()
    if args.quick:
        args.objectives, args.steps, args.seeds, args.readme_steps, args.ratios = "saliency,pmmp", 3, 1, 0, "0.6"
        args.test_windows = args.val_windows = args.ood_windows = 1
    ratios = [float(r) for r in args.ratios.split(",")]
    objectives = args.objectives.split(",")

    model, tokenizer = hfc.load_model(args.model)
    splits = perplexity_splits(tokenizer, args.test_windows, args.val_windows, args.ood_windows)
    data = hfc.calibration_data(tokenizer, args.calibration, seq_len=args.seq_len)
    results = {"protocol": {"model": args.model, "steps": args.steps, "seq_len": args.seq_len, "batch_size": 4, "stop_ratio": 0.4,
                            "lora_rank": args.lora_rank, "calibration": args.calibration, "windows_of_512":
                                {k: len(v) for k, v in splits.items()}},
               "versions": versions(), "dense": {n: round(perplexity(model, w)["perplexity"], 3)
                                                 for n, w in splits.items()}, "runs": {}}

    svd = svd_compressible(model, data)
    results["runs"]["whitened SVD, uniform"] = [{"sizes": measure(
        lambda r: svd.materialize(plan=svd.uniform_ranks(r)), ratios, splits)}]
    allocation = None
    for objective in [DEFAULT] + [o for o in objectives if o != DEFAULT]:
        for lora in sorted({0, args.lora_rank}):  # --lora-rank 0: no LoRA rows
            seeds = args.seeds if objective in (DEFAULT, "acip") and not lora else 1
            name = objective + (f" + LoRA {lora}" if lora else "")
            results["runs"][name] = []
            for seed in range(seeds):
                record, cm = run_pass(args.model, data, ratios, splits, objective=objective, max_steps=args.steps,
                                      lora_rank=lora, seed=seed)
                results["runs"][name].append(record)
                if allocation is None:  # the default pass, seed 0: its per-layer ranks on SVD's own values
                    allocation = cm
                    results["runs"]["whitened SVD, the default's allocation"] = [{"sizes": measure(
                        lambda r: svd.materialize(plan=allocation.plan_at(r, structure="svd").ranks), ratios, splits)}]
    if args.readme_steps:
        record, _ = run_pass(args.model, data, ratios, splits, objective=DEFAULT, max_steps=args.readme_steps, seed=0)
        results["runs"][f"{DEFAULT}, README pass ({args.readme_steps} steps)"] = [record]

    base = results["runs"][DEFAULT][0]["pass_seconds"]
    rows = {"dense": [" / ".join(f"{results['dense'][s]:.1f}" for s in ("test", "out-of-domain"))] * len(ratios)
            + ["-", "-"]}
    for name, records in results["runs"].items():
        cells = [" / ".join(spread(records, str(r), s) for s in ("test", "out-of-domain")) for r in ratios]
        timed = records[0].get("pass_seconds")
        cells += [f"{records[0]['steps']} ({records[0]['final_ratio']:.2f})" if timed else "-",
                  f"{statistics.mean(r['pass_seconds'] for r in records) / base:.2f}x" if timed else "-"]
        rows[name] = cells
    results["validation"] = validation_ranking(results["runs"], ratios)
    save_and_print(args.out, "objectives_demo", results,
                   [f"{r} (test / out-of-domain)" for r in ratios] + ["steps (final ratio)", "pass time"], rows)
    print("\nmean log-perplexity on validation over all sizes (lower is better):")
    for name, value in results["validation"].items():
        print(f"  {name}: {value:.3f}")


def validation_ranking(runs: dict, ratios) -> dict:
    """Mean over sizes and seeds of log validation perplexity: how the default is chosen."""
    scores = {name: statistics.mean(math.log(r["sizes"][str(ratio)]["validation"]) for r in records for ratio in ratios)
              for name, records in runs.items()}
    return dict(sorted(scores.items(), key=lambda item: item[1]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
