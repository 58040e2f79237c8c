"""ACIP on the demo model: step cost vs dense, materialization time, held-out perplexity.

    python bench/acip_demo.py [--steps 200] [--seq-len 256] [--batch-size 4] [--lora-rank 0]

Writes bench/results/acip_demo.json and prints the Markdown rows for docs/BENCHMARKS.md.
Times are ratios measured in this one run, on this machine.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import hf_compress as hfc
from hf_compress.evaluate import perplexity
from hf_compress.models import find_targets

RESULTS = Path(__file__).with_name("results") / "acip_demo.json"


def timed(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_step_seconds(model, batch):
    """Forward + backward of the dense model with the targeted weights trainable."""
    targets = find_targets(model)
    for module in targets.values():
        module.weight.requires_grad_(True)

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = timed(step)
    model.requires_grad_(False)
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--stop-ratio", type=float, default=0.4)
    args = parser.parse_args()
    wall = time.perf_counter()

    model, tokenizer = hfc.load_model("demo")
    data = hfc.calibration_data(tokenizer, "builtin", seq_len=args.seq_len)
    heldout = hfc.calibration_data(tokenizer, "builtin", seq_len=512, split="heldout", max_windows=8)
    dense_step = dense_step_seconds(model, data[: args.batch_size])
    dense_ppl = perplexity(model, heldout)

    compressible = hfc.acip(model, data, stop_ratio=args.stop_ratio, max_steps=args.steps,
                            batch_size=args.batch_size, lora_rank=args.lora_rank)
    history = compressible.summary["history"]
    first = statistics.median(h["seconds"] for h in history[1:4])
    last = statistics.median(h["seconds"] for h in history[-3:])

    materialize = timed(lambda: compressible.materialize(0.6))
    perplexities = {"1.0 (dense)": dense_ppl["perplexity"]}
    for ratio in (1.0, 0.9, 0.8, 0.6, 0.4):
        perplexities[str(ratio)] = perplexity(compressible.materialize(ratio), heldout)["perplexity"]

    result = {
        "command": "python bench/acip_demo.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "heldout": {k: dense_ppl[k] for k in ("tokens", "windows", "seq_len")},
        "pass": {k: v for k, v in compressible.summary.items() if k != "history"},
        "dense_step_seconds": dense_step,
        "acip_step_vs_dense": {"start": first / dense_step, "end": last / dense_step,
                               "end_size_ratio": history[-1]["size_ratio"]},
        "materialize_seconds_at_0.6": materialize,
        "perplexity": perplexities,
        "wall_seconds": time.perf_counter() - wall,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| size ratio | " + " | ".join(perplexities) + " |")
    print("|---" * (len(perplexities) + 1) + "|")
    print("| held-out ppl | " + " | ".join(f"{v:.2f}" for v in perplexities.values()) + " |")


if __name__ == "__main__":
    main()
