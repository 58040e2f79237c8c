"""How the defaults of issue 22 were chosen, on validation text: when each kind of unit dies in a
pass, and compensation's ridge and the structure at one size, against activation pruning.

    python bench/units_tuning.py deaths bench/runs/demo_all_labels_0_60        # a pass with --units all
    python bench/units_tuning.py compensation bench/runs/demo_channels_labels_0_60 --size 0.8 \\
        --damping 0,0.01,1,10,100 --structures mixed,channels,svd

(bench/units_demo.py writes those pass directories.) Perplexity: the last 4 windows of 512 tokens
of the validation splits of pydoc, wiki and news. Prints one line per setting.
"""

import argparse
import importlib

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity

compensation_module = importlib.import_module("hf_compress.acip.compensate")  # `hf_compress.acip` is also a function


def deaths(cm: hfc.CompressibleModel) -> None:
    """Units of each kind that had died by every fifth step (scores of dead units count the steps
    since their death)."""
    steps = cm.summary["steps"]
    kinds = {"singular values": [f.score for f in cm.layers.values()],
             "MLP channels": [u.score for u in cm.units.values() if u.ref.site.kind == "mlp"],
             "head groups": [u.score for u in cm.units.values() if u.ref.site.kind == "attention"]}
    for kind, scores in kinds.items():
        if scores:
            score = torch.cat(scores)
            died = (steps + score[score <= 0].ceil()).long()
            print(kind, len(score), "units; dead by step", {s: int((died < s).sum()) for s in range(5, steps + 1, 5)})
    for size in (0.9, 0.8, 0.7, 0.6):
        [row] = cm.sizes([size])
        print(size, "removes", {key: row[key] for key in ("mlp_channels", "head_groups", "factorized_layers")})


def compensation(cm: hfc.CompressibleModel, args) -> None:
    tokenizer = cm.tokenizer
    windows = {d: hfc.calibration_data(tokenizer, f"builtin:{d}", seq_len=512, split="validation")[-4:]
               for d in ("pydoc", "wiki", "news")}
    cm.windows = cm.windows[:args.windows]
    for structure in args.structures.split(","):
        plan = cm.plan_at(args.size, structure=structure)
        [row] = cm.sizes([args.size], structure)
        removed = {key: row[key] for key in ("mlp_channels", "head_groups", "factorized_layers")}
        for damping in map(float, args.damping.split(",")):
            compensation_module.DAMPING = damping
            model = cm.materialize(plan=plan, compensate=damping > 0)
            scores = {d: round(perplexity(model, w)["perplexity"], 2) for d, w in windows.items()}
            print(args.size, structure, f"ridge {damping}" if damping else "not compensated", scores,
                  removed, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("deaths", "compensation"))
    parser.add_argument("run", help="a compressible directory")
    parser.add_argument("--size", type=float, default=0.8)
    parser.add_argument("--damping", default="0,0.01,1,10,100")
    parser.add_argument("--structures", default="mixed,channels,svd")
    parser.add_argument("--windows", type=int, default=16, help="compensation windows (of those the pass kept)")
    args = parser.parse_args()
    cm = hfc.CompressibleModel.from_pretrained(args.run)
    deaths(cm) if args.what == "deaths" else compensation(cm, args)


if __name__ == "__main__":
    main()
