"""Quantization composed with ACIP and folding on the demo model: held-out perplexity against
the bytes of the checkpoint's weights, the frontier, and the best combination at three budgets.

    python bench/quantize_demo.py                      # the full benchmark (~45 min on 2 cores)
    python bench/quantize_demo.py --quick --out DIR    # a reduced run, so that CI keeps it alive

Models: the dense demo in float32 / bfloat16 / int8 / nf4 (and nf4 with bfloat16 embeddings),
ACIP at several size ratios from one pass (reused from --pass-dir when it holds one) without
quantization, with int8 and with nf4 (some also in bfloat16), and the default fold with and
without nf4. Perplexity windows (512 tokens): test = the first --test-windows of the builtin
test split (the windows earlier benchmarks report), validation = the last --val-windows of its
validation split (the best combination at each budget is chosen on these), out-of-domain =
the news corpus (ABC news, in no calibration set). Writes OUT/quantize_demo.json
and OUT/quantize_demo.png and prints the Markdown for docs/BENCHMARKS.md.
"""

import argparse
import gc
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions
from hf_compress.layers import tensor_bytes

from common import perplexity_splits, save_and_print

HERE = Path(__file__).parent


def compressible(args, tokenizer):
    """The ACIP pass, loaded from --pass-dir if a previous run left one there."""
    path = Path(args.pass_dir)
    if (path / "acip.json").is_file():
        return hfc.CompressibleModel.from_pretrained(path), None
    model, _ = hfc.load_model(args.model)
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len)
    start = time.perf_counter()
    result = hfc.acip(model, data, max_steps=args.steps, stop_ratio=0.4, batch_size=4)
    seconds = time.perf_counter() - start
    result.save_pretrained(path, overwrite=True)
    return result, seconds


def configurations(args, cm):
    """name -> (family, quantization, dtype, build): each build makes a fresh model."""
    def dense(dtype, method=None):
        model = hfc.load_model(args.model)[0].to(dtype)
        return hfc.quantize(model, method) if method else model

    def acip(ratio, method, dtype):  # the bfloat16 ones come last: cm is not cast back
        return cm.to(dtype=dtype).materialize(ratio, quantize=method)

    def folded(method):
        return hfc.fold(hfc.load_model(args.model)[0], ratio=args.fold_ratio, quantize=method, show_progress=False)

    fp32, bf16 = torch.float32, torch.bfloat16
    methods = (None, "nf4") if args.quick else (None, "int8", "nf4")
    configs = {f"dense {method or 'fp32'}": ("dense", method, "fp32", lambda m=method: dense(fp32, m))
               for method in methods}
    if not args.quick:
        configs |= {"dense bf16": ("dense", None, "bf16", lambda: dense(bf16)),
                    "dense nf4, bf16": ("dense", "nf4", "bf16", lambda: dense(bf16, "nf4"))}
    for ratio in args.ratios:
        for method in methods:
            name = f"ACIP {ratio}" + (f" {method}" if method else "")
            configs[name] = ("ACIP", method, "fp32", lambda r=ratio, m=method: acip(r, m, fp32))
    for ratio in args.bf16_ratios:
        configs[f"ACIP {ratio} nf4, bf16"] = ("ACIP", "nf4", "bf16", lambda r=ratio: acip(r, "nf4", bf16))
    for method in (None, "nf4"):
        configs[f"fold {args.fold_ratio}" + (f" {method}" if method else "")] = (
            "fold", method, "fp32", lambda m=method: folded(m))
    return configs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what hf-compress loads (the tests pass a tiny checkpoint)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.9,0.8,0.6,0.4")
    parser.add_argument("--bf16-ratios", default="0.8")
    parser.add_argument("--fold-ratio", type=float, default=0.9)
    parser.add_argument("--budgets-mib", default="120,180,300")
    parser.add_argument("--test-windows", type=int, default=8)
    parser.add_argument("--val-windows", type=int, default=4)
    parser.add_argument("--ood-windows", type=int, default=4)
    parser.add_argument("--pass-dir", default="runs/bench-quantize-acip")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few steps and windows, two sizes")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.ratios, args.bf16_ratios = 4, 64, "0.6", ""
        args.test_windows = args.val_windows = args.ood_windows = 1
        args.pass_dir = str(args.out / "acip")
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.bf16_ratios = [float(r) for r in args.bf16_ratios.split(",") if r]
    budgets = [float(b) for b in args.budgets_mib.split(",")]
    torch.manual_seed(0)

    _, tokenizer = hfc.load_model(args.model)
    splits = perplexity_splits(tokenizer, args.test_windows, args.val_windows, args.ood_windows)
    cm, pass_seconds = compressible(args, tokenizer)

    timings = {"materialize 0.6, seconds": time.perf_counter()}
    cm.materialize(0.6)
    timings["materialize 0.6, seconds"] = time.perf_counter() - timings["materialize 0.6, seconds"]
    start = time.perf_counter()
    cm.materialize(0.6, quantize="nf4")
    timings["materialize 0.6 + nf4, seconds"] = time.perf_counter() - start

    results = {}
    for name, (family, method, dtype, build) in configurations(args, cm).items():
        start = time.perf_counter()
        model = build()
        record = {"family": family, "quantization": method, "dtype": dtype, "bytes": tensor_bytes(model),
                  "size_ratio": (getattr(model.config, "hf_compress", None) or {}).get("size_ratio", 1.0)}
        for split, windows in splits.items():
            record[split] = perplexity(model, windows)["perplexity"]
        record["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = record
        print(f"{name}: {record['bytes'] / 2**20:.1f} MiB, " + ", ".join(f"{s} {record[s]:.2f}" for s in splits),
              flush=True)
        del model
        gc.collect()

    best = {}
    for budget in budgets:
        fitting = {n: r for n, r in results.items() if r["bytes"] <= budget * 2**20}
        if fitting:
            name = min(fitting, key=lambda n: fitting[n]["validation"])
            best[f"{budget:g} MiB"] = {"choice": name, **{s: fitting[name][s] for s in splits}}

    summary = {"versions": versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
               "pass_seconds": pass_seconds, "windows": {s: len(w) for s, w in splits.items()},
               "timings": timings, "results": results, "best_at_budget": best}
    columns = ["MiB", "size ratio", *(f"{s} ppl" for s in splits)]
    rows = {name: [f"{r['bytes'] / 2**20:.1f}", f"{r['size_ratio']:.3f}", *(f"{r[s]:.2f}" for s in splits)]
            for name, r in sorted(results.items(), key=lambda item: item[1]["bytes"])}
    save_and_print(args.out, "quantize_demo", summary, columns, rows)
    print("\n| budget | best on validation | " + " | ".join(f"{s} ppl" for s in splits) + " |")
    print("|---" * (len(splits) + 2) + "|")
    for budget, choice in best.items():
        print(f"| {budget} | {choice['choice']} | " + " | ".join(f"{choice[s]:.2f}" for s in splits) + " |")
    plot(results, args.out / "quantize_demo.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {("dense", None): "s", ("dense", "int8"): "D", ("dense", "nf4"): "P", ("ACIP", None): "o",
              ("ACIP", "int8"): "^", ("ACIP", "nf4"): "v", ("fold", None): "x", ("fold", "nf4"): "X"}
    for (family, method), marker in styles.items():
        points = [(r["bytes"] / 2**20, r["test"], r["dtype"]) for r in results.values()
                  if r["family"] == family and r["quantization"] == method]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=55,
                       label=f"{family}" + (f" + {method}" if method else ""))
    ordered = sorted(results.items(), key=lambda item: item[1]["bytes"])
    frontier, best = [], float("inf")
    for name, r in ordered:
        if r["test"] < best:
            best = r["test"]
            frontier.append((r["bytes"] / 2**20, r["test"]))
    ax.step([f[0] for f in frontier], [f[1] for f in frontier], where="post", color="gray", alpha=0.6,
            label="frontier (test)")
    for name, r in results.items():
        ax.annotate(name, (r["bytes"] / 2**20, r["test"]), fontsize=6, alpha=0.7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("weights of the checkpoint (MiB)")
    ax.set_ylabel("held-out perplexity, test windows (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: compression x quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
