"""ACIP against closed-form baselines on the demo model: one run, one protocol, every method.

    python bench/compare_demo.py                       # the full benchmark (~35 min on 2 cores)
    python bench/compare_demo.py --quick --out DIR     # a reduced run, so that CI keeps it alive

Methods at each size ratio: plain truncated SVD (uniform ratio), activation-whitened SVD
(uniform ratio, and with ACIP's per-layer allocation), ACIP without and with LoRA (every size
from one pass). Also measured, as ratios within this run: ACIP step time vs a dense
forward+backward step, materialization time, and for saved checkpoints inference latency, peak
memory (fresh process) and file bytes vs dense. Writes OUT/compare_demo.json and
OUT/compare_demo.png, and prints the Markdown for docs/BENCHMARKS.md.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.acip.train import svd_compressible
from hf_compress.checkpoint import save_checkpoint
from hf_compress.evaluate import perplexity, versions
from hf_compress.layers import find_targets

from common import save_and_print

HERE = Path(__file__).parent

# Run in a fresh process per checkpoint: load, time a forward pass, report peak resident memory
# (VmHWM: unlike ru_maxrss it is not inherited from the parent across exec).
PROBE = """
import json, re, statistics, sys, time, torch
import hf_compress as hfc
torch.set_num_threads({threads})
model, _ = hfc.load_model(sys.argv[1])
ids = torch.randint(0, model.config.vocab_size, (1, {seq_len}), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    for _ in range(4):
        start = time.perf_counter(); model(ids); times.append(time.perf_counter() - start)
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({{"latency": statistics.median(times[1:]), "peak_rss_mib": peak_kib / 1024}}))
"""


def median_seconds(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_step_seconds(model, batch):
    """Forward + backward of the dense model with the targeted weights trainable."""
    for module in find_targets(model).values():
        module.weight.requires_grad_(True)

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = median_seconds(step)
    model.requires_grad_(False)
    return seconds


def probe(path: Path, seq_len: int) -> dict:
    code = PROBE.format(threads=torch.get_num_threads(), seq_len=seq_len)
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    stats["bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return stats


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = 1000
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in results["perplexity"].items():
        ratios = sorted(float(r) for r in points)
        values = [points[str(r)] for r in ratios]
        label = method + (f" (above {ceiling}: off the chart)" if max(values) > ceiling else "")
        ax.plot(ratios, values, marker="o", label=label)
    ax.set_ylim(results["dense_perplexity"] * 0.7, ceiling)
    ax.axhline(results["dense_perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("size ratio (targeted Linear layers)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M, builtin held-out split")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what hf-compress loads (the tests pass a tiny checkpoint)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--stop-ratio", type=float, default=0.4)
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5,0.4")
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few steps and sizes: keeps the script alive in CI")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.ratios, args.heldout_windows, args.lora_rank = 3, 64, "0.8,0.5", 1, 2
    ratios = [float(r) for r in args.ratios.split(",")]
    wall = time.perf_counter()

    model, tokenizer = hfc.load_model(args.model)
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len)
    heldout = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="test",
                                   max_windows=args.heldout_windows)
    dense_ppl = perplexity(model, heldout)["perplexity"]
    dense_step = dense_step_seconds(model, data[: args.batch_size])

    settings = dict(stop_ratio=args.stop_ratio, max_steps=args.steps, batch_size=args.batch_size)
    plain = svd_compressible(model, data, basis="plain")
    whitened = svd_compressible(model, data, basis="whitened")
    passes = {"ACIP": hfc.acip(model, data, **settings)}
    if args.lora_rank:
        passes[f"ACIP + LoRA {args.lora_rank}"] = hfc.acip(model, data, lora_rank=args.lora_rank, **settings)
    acip = passes["ACIP"]

    methods = {
        "plain SVD, uniform": lambda r: plain.materialize(plan=plain.uniform_ranks(r)),
        "whitened SVD, uniform": lambda r: whitened.materialize(plan=whitened.uniform_ranks(r)),
        "whitened SVD, ACIP allocation": lambda r: whitened.materialize(plan=acip.plan_at(r, structure="svd").ranks),
        **{name: (lambda r, cm=cm: cm.materialize(r)) for name, cm in passes.items()},
    }
    table = {name: {} for name in methods}
    for name, build in methods.items():
        for ratio in ratios:
            table[name][str(ratio)] = perplexity(build(ratio), heldout)["perplexity"]
            print(f"{name:32s} {ratio:.1f} {table[name][str(ratio)]:10.3f}", flush=True)

    history = acip.summary["history"]
    step_ratio = {"start": statistics.median(h["seconds"] for h in history[:3]) / dense_step,
                  "end": statistics.median(h["seconds"] for h in history[-3:]) / dense_step,
                  "end_size_ratio": history[-1]["size_ratio"]}
    materialize = median_seconds(lambda: acip.materialize(0.6))

    deployed = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tokenizer, Path(tmp) / "dense")
        dense = probe(Path(tmp) / "dense", 512)
        for ratio in ratios[:: max(1, len(ratios) // 3)]:
            save_checkpoint(acip.materialize(ratio), tokenizer, Path(tmp) / f"acip-{ratio}")
            stats = probe(Path(tmp) / f"acip-{ratio}", 512)
            deployed[str(ratio)] = {"latency_vs_dense": stats["latency"] / dense["latency"],
                                    "peak_rss_vs_dense": stats["peak_rss_mib"] / dense["peak_rss_mib"],
                                    "bytes_vs_dense": stats["bytes"] / dense["bytes"]}

    results = {
        "command": "python bench/compare_demo.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "heldout_tokens": heldout[:, 1:].numel(),
        "dense_perplexity": dense_ppl,
        "perplexity": table,
        "passes": {name: {k: v for k, v in cm.summary.items() if k != "history"} for name, cm in passes.items()},
        "acip_step_vs_dense_step": step_ratio,
        "materialize_seconds": materialize,
        "dense_checkpoint": dense,
        "deployed_vs_dense": deployed,
        "wall_seconds": time.perf_counter() - wall,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "compare_demo.png")
    save_and_print(args.out, "compare_demo", results, [f"{r:.1f}" for r in ratios],
                   {name: [f"{row[str(r)]:.2f}" for r in ratios] for name, row in table.items()})

if __name__ == "__main__":
    main()
