"""Data-free folding on the demo model: k-means folding against magnitude pruning (`prune
--method magnitude`, also data-free) on the same units, heads, layer schedules (and the per-block sensitivity behind the default one),
fold-then-ACIP against ACIP alone, and folding time.

    python bench/fold_demo.py                      # ~20 min on 2 cores
    python bench/fold_demo.py --quick --out DIR    # reduced, so that CI keeps it alive

Writes OUT/fold_demo.json and OUT/fold_demo.png and prints the Markdown rows for docs/BENCHMARKS.md.
"""

import argparse
import copy
import functools
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions
from hf_compress.shrink import FoldConfig
from hf_compress.shrink.kmeans import KMeansFold
from hf_compress.shrink.rewrite import shrink_site
from hf_compress.shrink.sites import mlp_site

from common import save_and_print

HERE = Path(__file__).parent
HEADS = 2 / 3  # 2 of the demo's 3 key/value head groups


def llama7b_mlp_seconds(seed: int = 0) -> float:
    """Time to fold one MLP of LLaMA-7B shape (11008 channels of 3 x 4096 features) to 0.9."""
    torch.manual_seed(seed)
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.gate_proj = nn.Linear(4096, 11008, bias=False)
    block.mlp.up_proj = nn.Linear(4096, 11008, bias=False)
    block.mlp.down_proj = nn.Linear(11008, 4096, bias=False)
    start = time.perf_counter()
    with torch.no_grad():
        shrink_site(block, 0, mlp_site(block), 0.9, KMeansFold(FoldConfig()))
    return time.perf_counter() - start


def plot(results: dict, path: Path) -> None:
    """Perplexity against size for each variant, and the cost of folding each block alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, points in results["perplexity"].items():
        ratios = sorted(points, key=float)
        left.plot([results["size_ratio"][name][r] for r in ratios], [points[r] for r in ratios], marker="o", label=name)
    left.axhline(results["dense_perplexity"], color="gray", linestyle="--", label="dense")
    left.set(yscale="log", xlabel="size ratio (targeted Linear layers)", ylabel="held-out perplexity (log scale)",
             title="Folding vs magnitude pruning (MLP ratios 0.9 / 0.8 / 0.7)")
    left.legend(fontsize=7)
    single = results["one_block_perplexity"]
    blocks = single["blocks"]
    for offset, method in ((-0.2, "kmeans"), (0.2, "magnitude")):
        right.bar([b + offset for b in range(len(blocks))], single[method], width=0.4, label=method)
    right.axhline(results["dense_perplexity"], color="gray", linestyle="--", label="dense")
    right.set(yscale="log", xlabel="block folded alone", ylabel="held-out perplexity (log scale)",
              title=f"One block folded at MLP ratio {single['ratio']}")
    right.set_xticks(range(len(blocks)), blocks, fontsize=7)
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what hf-compress loads (the tests pass a tiny checkpoint)")
    parser.add_argument("--ratios", default="0.9,0.8,0.7")
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--sensitivity-ratio", type=float, default=0.5)
    parser.add_argument("--acip-steps", type=int, default=60)
    parser.add_argument("--combined-ratio", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.heldout_windows, args.acip_steps = "0.9", 1, 2
    ratios = [float(r) for r in args.ratios.split(",")]
    wall = time.perf_counter()

    model, tokenizer = hfc.load_model(args.model)
    heldout = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="test",
                                   max_windows=args.heldout_windows)
    dense_ppl = perplexity(model, heldout)["perplexity"]
    n_blocks = model.config.num_hidden_layers

    def score(method: str = "kmeans", **settings) -> tuple[float, float, float]:
        """(held-out perplexity, size ratio, seconds) of a fold (or magnitude prune) of a fresh copy."""
        start = time.perf_counter()
        shrink = hfc.fold if method == "kmeans" else functools.partial(hfc.prune, method=method)
        folded = shrink(copy.deepcopy(model), show_progress=False, **settings)
        seconds = time.perf_counter() - start
        return perplexity(folded, heldout)["perplexity"], folded.config.hf_compress["size_ratio"], seconds

    middle = dict(layers="middle")  # the default schedule when these figures were measured
    variants = {  # name: settings; the "middle" schedule unless said (bench/shrink_demo.py has "global")
        "magnitude pruning": dict(method="magnitude", **middle),
        "k-means fold": middle,
        "magnitude pruning + heads (2 of 3 KV groups)": dict(method="magnitude", heads_ratio=HEADS, **middle),
        "k-means fold + heads (2 of 3 KV groups)": dict(heads_ratio=HEADS, **middle),
        "magnitude pruning, every block": dict(method="magnitude", layers="all"),
        "k-means fold, every block": dict(layers="all"),
    }
    table, sizes, seconds = {}, {}, {}
    for name, settings in variants.items():
        table[name], sizes[name] = {}, {}
        for ratio in ratios:
            table[name][str(ratio)], sizes[name][str(ratio)], took = score(ratio=ratio, **settings)
            seconds.setdefault(name, took)
            print(f"{name:46s} {ratio:.1f} size {sizes[name][str(ratio)]:.3f} ppl {table[name][str(ratio)]:10.2f} "
                  f"{took:5.1f} s", flush=True)

    # The default schedule comes from this: each block folded alone, k-means and magnitude.
    blocks = [0, n_blocks - 1] if args.quick else range(n_blocks)
    sensitivity = {method: [score(ratio=args.sensitivity_ratio, layers=[b], method=method)[0] for b in blocks]
                   for method in ("kmeans", "magnitude")}
    print("one block folded at", args.sensitivity_ratio, {m: [round(p, 1) for p in v] for m, v in sensitivity.items()})

    # Fold-then-ACIP against ACIP alone at one combined size of the original targeted layers.
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=128)
    settings = dict(max_steps=args.acip_steps, stop_ratio=0.4, batch_size=4, show_progress=False)
    alone = hfc.acip(copy.deepcopy(model), data, **settings).materialize(args.combined_ratio)
    folded = hfc.fold(copy.deepcopy(model), ratio=0.9, show_progress=False, **middle)
    fold_ratio = folded.config.hf_compress["size_ratio"]
    on_fold = hfc.acip(folded, data, **settings).materialize(args.combined_ratio / fold_ratio)
    composed = {"combined_ratio": args.combined_ratio, "acip_steps": args.acip_steps,
                "ACIP alone": perplexity(alone, heldout)["perplexity"],
                "fold 0.9 then ACIP": perplexity(on_fold, heldout)["perplexity"]}
    print(composed, flush=True)

    results = {
        "command": "python bench/fold_demo.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(),
        "heldout_tokens": heldout[:, 1:].numel(),
        "dense_perplexity": dense_ppl,
        "perplexity": table,
        "size_ratio": sizes,
        "fold_seconds_demo": seconds,
        "one_block_perplexity": {"ratio": args.sensitivity_ratio, "blocks": list(blocks), **sensitivity},
        "fold_seconds_llama7b_mlp_layer": None if args.quick else llama7b_mlp_seconds(),
        "fold_then_acip": composed,
        "wall_seconds": time.perf_counter() - wall,
    }
    save_and_print(args.out, "fold_demo", results, [f"MLP {r:.1f}" for r in ratios],
                   {name: [f"{row[str(r)]:.1f} ({sizes[name][str(r)]:.3f})" for r in ratios]
                    for name, row in table.items()})
    plot(results, args.out / "fold_demo.png")


if __name__ == "__main__":
    main()
