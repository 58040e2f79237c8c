"""Data-free folding on the demo model: k-means folding against magnitude pruning, the variance
correction, layer schedules, heads, fold-then-ACIP, and folding time.

    python bench/fold_demo.py                      # ~25 min on 2 cores
    python bench/fold_demo.py --quick --out DIR    # reduced, so that CI keeps it alive

Writes OUT/fold_demo.json and prints the Markdown rows for docs/BENCHMARKS.md.
"""

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions
from hf_compress.fold.config import FoldConfig
from hf_compress.fold.model import fold_site, mlp_site

from _report import save_and_print

HERE = Path(__file__).parent


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
        fold_site(block, mlp_site(block), 0.9, FoldConfig())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.9,0.8,0.7")
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--acip-steps", type=int, default=30)
    parser.add_argument("--combined-ratio", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.heldout_windows, args.acip_steps = "0.9", 1, 2
    ratios = [float(r) for r in args.ratios.split(",")]
    wall = time.perf_counter()

    model, tokenizer = hfc.load_model("demo")
    heldout = hfc.calibration_data(tokenizer, "builtin", seq_len=512, split="heldout",
                                   max_windows=args.heldout_windows)
    dense_ppl = perplexity(model, heldout)["perplexity"]
    n_blocks = model.config.num_hidden_layers
    every = dict(layers=[0, 1]) if args.quick else {}  # quick: two blocks are enough to run the code
    variants = {  # name: (settings, MLP ratios)
        "magnitude pruning": (dict(method="magnitude", **every), ratios),
        "k-means fold": (dict(every), ratios),
        "k-means fold + variance correction": (dict(variance_correction=True, **every), ratios),
        "k-means fold, 5% largest protected": (dict(protect=0.05, **every), ratios[:1]),
        "k-means fold, blocks 2..n-3 only": (dict(layers=[1] if args.quick else list(range(2, n_blocks - 2))),
                                             ratios[:1]),
        "k-means fold + heads (2 of 3 KV groups)": (dict(heads_ratio=2 / 3, **every), ratios[:1]),
    }
    table, sizes, seconds = {}, {}, {}
    for name, (settings, variant_ratios) in variants.items():
        table[name], sizes[name] = {}, {}
        for ratio in variant_ratios:
            start = time.perf_counter()
            folded = hfc.fold(copy.deepcopy(model), ratio=ratio, show_progress=False, **settings)
            seconds.setdefault(name, time.perf_counter() - start)
            table[name][str(ratio)] = perplexity(folded, heldout)["perplexity"]
            sizes[name][str(ratio)] = folded.config.hf_compress["size_ratio"]
            print(f"{name:42s} {ratio:.1f} size {sizes[name][str(ratio)]:.3f} ppl {table[name][str(ratio)]:10.2f}",
                  flush=True)

    # Fold-then-ACIP against ACIP alone at one combined size of the original targeted layers.
    data = hfc.calibration_data(tokenizer, "builtin", seq_len=128)
    settings = dict(max_steps=args.acip_steps, stop_ratio=0.4, batch_size=4, show_progress=False)
    alone = hfc.acip(copy.deepcopy(model), data, **settings).materialize(args.combined_ratio)
    folded = hfc.fold(copy.deepcopy(model), ratio=0.9, show_progress=False, **every)
    fold_ratio = folded.config.hf_compress["size_ratio"]
    on_fold = hfc.acip(folded, data, **settings).materialize(args.combined_ratio / fold_ratio)
    composed = {"combined_ratio": args.combined_ratio, "acip_steps": args.acip_steps,
                "ACIP alone": perplexity(alone, heldout)["perplexity"],
                "fold 0.9 then ACIP": perplexity(on_fold, heldout)["perplexity"]}

    results = {
        "command": "python bench/fold_demo.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(),
        "heldout_tokens": heldout[:, 1:].numel(),
        "dense_perplexity": dense_ppl,
        "perplexity": table,
        "size_ratio": sizes,
        "fold_seconds_demo": seconds,
        "fold_seconds_llama7b_mlp_layer": None if args.quick else llama7b_mlp_seconds(),
        "fold_then_acip": composed,
        "wall_seconds": time.perf_counter() - wall,
    }
    save_and_print(args.out, "fold_demo", results, [f"MLP {r:.1f}" for r in ratios],
                   {name: [f"{row[str(r)]:.1f} ({sizes[name][str(r)]:.2f})" if str(r) in row else "–"
                           for r in ratios] for name, row in table.items()})

if __name__ == "__main__":
    main()
