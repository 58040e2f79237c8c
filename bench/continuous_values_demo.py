"""Should the continuous objectives' trained values go into the checkpoint? One pass each of
drr, pmmp and nuclear on the demo, materialized two ways from the same pass: "ranked" (what
hf-compress ships: the masks rank the values, every size keeps the original singular values)
and "trained" (alive values stored as s x mask, what the model saw at the end of the pass; dead
ones keep s). Test perplexity (the first --windows windows of 256 tokens of the builtin test
split) at 0.9, 0.6 and just above the pass's final size. Prints a Markdown table and writes
OUT/continuous_values_demo.json.

    python bench/continuous_values_demo.py               # 3 passes of 30 steps x 64 tokens, ~15 min
"""

import argparse
import importlib
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions

from common import save_and_print

HERE = Path(__file__).parent
train = importlib.import_module("hf_compress.acip.train")  # the package re-exports a function named acip


def both_ways(objective: str, data, steps: int) -> tuple[dict, dict]:
    """The pass's result built twice from the same layers: ranked (as shipped) and trained."""
    built, shipped = {}, train._to_compressible

    def capture(model, layers, config, summary, tokenizer):
        built["ranked"] = shipped(model, layers, config, summary, tokenizer)
        originals = {name: layer.s.clone() for name, layer in layers.items()}
        for layer in layers.values():  # what the model saw: alive values scaled by their gates
            layer.s.copy_(torch.where(layer.alive, layer.s * layer.mask.detach().clamp(min=0), layer.s))
        built["trained"] = shipped(model, layers, config, summary, tokenizer)
        for name, layer in layers.items():
            layer.s.copy_(originals[name])
        return built["ranked"]

    train._to_compressible = capture
    try:
        model, _ = hfc.load_model("demo")
        result = hfc.acip(model, data, objective=objective, max_steps=steps, stop_ratio=0.4, batch_size=4,
                          show_progress=False)
    finally:
        train._to_compressible = shipped
    return built, result.summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="drr,pmmp,nuclear")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    _, tokenizer = hfc.load_model("demo")
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len)
    test = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=256, split="test", max_windows=args.windows)
    results = {"protocol": vars(args) | {"out": str(args.out)}, "versions": versions(), "objectives": {}}
    rows = {}
    for objective in args.objectives.split(","):
        torch.manual_seed(0)
        built, summary = both_ways(objective, data, args.steps)
        final = round(summary["final_ratio"] + 0.01, 3)
        sizes = (0.9, 0.6, final)
        record = {"final_ratio": summary["final_ratio"], "steps": summary["steps"],
                  **{kind: {str(r): round(perplexity(cm.materialize(r), test)["perplexity"], 2) for r in sizes}
                     for kind, cm in built.items()}}
        results["objectives"][objective] = record
        print(objective, record, flush=True)
        for kind in built:
            rows[f"{objective}, {kind}"] = [f"{record[kind][str(r)]:,.1f}" for r in sizes] + [f"{final}"]
    save_and_print(args.out, "continuous_values_demo", results, ["0.9", "0.6", "final + 0.01", "final + 0.01 is"],
                   rows)


if __name__ == "__main__":
    main()
