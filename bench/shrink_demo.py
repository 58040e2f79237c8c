"""Smaller models of the same architecture (fold, prune) against each other and against ACIP, on
the demo model or --model demo:gemma3: one script, one run, same data.

Rows, at every whole-MLP size (the fraction of all MLP channels kept): folding with the global
allocation (the default; also with the variance repair and with dropped misfits), with the old
fixed schedule (every block but the first and last two, its ratio raised so the whole-MLP size
is the same), and uniform (`--layers all`: the vanilla architecture); magnitude and activation
pruning, uniform and global, and torque pruning (a training per size, which the global row reads
back: its seconds are the uniform row's) (--rows picks some); with --heads, the same
fraction of key/value head groups too (global only: a uniform fraction of a few groups a block
rounds to whole groups). Where the default fold ran: magnitude pruning to the very widths that
fold chose in each block (MLP only), which tells its merges from its allocation; and the default
ACIP pass materialized at the size that fold reached (targeted-layer parameters), so a reader
sees what loading without remote code costs.
Perplexity windows of 512 tokens (bench/common.py): test and validation splits of
pydoc, the news corpus as out-of-domain text; calibration (activation, torque, ACIP) is pydoc too.
Writes OUT/shrink_demo[_MODEL][_heads][_TAG].json.

    python bench/shrink_demo.py                                  # ~35 min on 2 cores
    python bench/shrink_demo.py --model demo:gemma3 --sizes 0.9 --windows 2 --acip-steps 0  # ~60 min
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions
from hf_compress.formats import size_report
from hf_compress.layers import decoder_blocks
from hf_compress.shrink.sites import mlp_site

from common import perplexity_splits, save_and_print

HERE = Path(__file__).parent
DEFAULT_FOLD = "fold, global allocation (default)"  # the row the ACIP and same-widths rows follow


def methods(n_blocks: int, heads: bool, torque_steps: int) -> dict:
    """name -> (function, settings at size s): every shrink the benchmark runs (the two torque
    rows share one run directory per size: the global row reads the uniform row's training back)."""
    edge = min(2, (n_blocks - 1) // 4)
    middle = n_blocks - 2 * edge

    runs = tempfile.mkdtemp()

    def torque(s):
        return dict(method="torque", ratio=s, max_steps=torque_steps, progress_dir=f"{runs}/{s}")

    def old_schedule(s):
        return dict(layers="middle", ratio=max(0.05, (s * n_blocks - 2 * edge) / middle))

    rows = {DEFAULT_FOLD: (hfc.fold, lambda s: dict(layers="global", ratio=s)),
            "fold, old schedule (middle blocks)": (hfc.fold, old_schedule),
            "fold, uniform (vanilla)": (hfc.fold, lambda s: dict(layers="all", ratio=s)),
            "magnitude, uniform": (hfc.prune, lambda s: dict(method="magnitude", layers="all", ratio=s)),
            "magnitude, global": (hfc.prune, lambda s: dict(method="magnitude", layers="global", ratio=s)),
            "activation, uniform": (hfc.prune, lambda s: dict(layers="all", ratio=s)),
            "activation, global": (hfc.prune, lambda s: dict(layers="global", ratio=s)),
            "torque, uniform": (hfc.prune, lambda s: torque(s) | dict(layers="all")),
            "torque, global": (hfc.prune, lambda s: torque(s) | dict(layers="global"))}
    if heads:
        rows = {f"{name} + heads": (fn, lambda s, settings=settings: settings(s) | dict(heads_ratio=s))
                for name, (fn, settings) in rows.items() if "global" in name}
    return rows


def same_widths(base, widths: list[int]):
    """Magnitude pruning of a copy of `base` to the given MLP width of each block."""
    full = mlp_site(decoder_blocks(base)[1][0]).reads[0].units
    return hfc.prune(copy.deepcopy(base), method="magnitude", layers={i: w / full for i, w in enumerate(widths)},
                     show_progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sizes", default="0.95,0.9,0.8,0.7")
    parser.add_argument("--heads", action="store_true", help="shrink key/value head groups by the same fraction")
    parser.add_argument("--windows", type=int, default=4, help="512-token windows per split")
    parser.add_argument("--calibration-windows", type=int, default=64, help="256-token windows for activation")
    parser.add_argument("--torque-steps", type=int, default=40, help="the torque rows' training steps")
    parser.add_argument("--acip-steps", type=int, default=30, help="the ACIP row's pass (0: no ACIP row)")
    parser.add_argument("--rows", default="", help="only the rows whose name contains one of these (';'-separated)")
    parser.add_argument("--tag", default="", help="appended to the file name (a partial run beside the full one)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    base, tokenizer = hfc.load_model(args.model)
    splits = perplexity_splits(tokenizer, args.windows, args.windows, args.windows)
    data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=256, max_windows=args.calibration_windows)

    def measure(model) -> dict:
        return {name: round(perplexity(model, windows)["perplexity"], 3) for name, windows in splits.items()}

    results = {"protocol": {"model": args.model, "sizes": sizes, "heads": args.heads, "windows_of_512": args.windows,
                            "calibration": f"builtin, {len(data)} x 256 tokens", "acip_steps": args.acip_steps,
                            "torque_steps": args.torque_steps},
               "versions": versions(), "dense": measure(base), "runs": {}}
    wanted = [part for part in args.rows.split(";") if part]  # row names hold commas
    for name, (shrink, settings) in methods(len(decoder_blocks(base)[1]), args.heads, args.torque_steps).items():
        if wanted and not any(part in name for part in wanted):
            continue
        results["runs"][name] = {}
        for size in sizes:
            model = copy.deepcopy(base)
            extra = {} if shrink is hfc.fold or settings(size).get("method") == "magnitude" else {"data": data}
            start = time.perf_counter()
            model = shrink(model, show_progress=False, **extra, **settings(size))
            seconds = time.perf_counter() - start
            cell = {"seconds": round(seconds, 2), "size_ratio": round(size_report(model)["size_ratio"], 4),
                    "mlp_widths": [mlp_site(block).reads[0].units for block in decoder_blocks(model)[1]]}
            results["runs"][name][str(size)] = cell | measure(model)
            print(name, size, results["runs"][name][str(size)], flush=True)

    default = DEFAULT_FOLD + (" + heads" if args.heads else "")
    if default in results["runs"] and not args.heads:  # is what the fold loses its allocation or its merges?
        results["runs"]["magnitude at the default fold's widths"] = {
            str(size): measure(same_widths(base, results["runs"][default][str(size)]["mlp_widths"]))
            for size in sizes}
    if args.acip_steps and default in results["runs"]:
        start = time.perf_counter()
        cm = hfc.acip(copy.deepcopy(base), data, max_steps=args.acip_steps, stop_ratio=0.4, batch_size=4,
                      show_progress=False)
        results["acip_pass_seconds"] = round(time.perf_counter() - start, 1)
        results["runs"]["ACIP at the default fold's size (remote code)"] = {
            str(size): {"size_ratio": results["runs"][default][str(size)]["size_ratio"]}
            | measure(cm.materialize(results["runs"][default][str(size)]["size_ratio"])) for size in sizes}

    columns = [f"{s} (test / val / news)" for s in sizes] + ["seconds at 0.9" if 0.9 in sizes else "seconds"]
    rows = {"dense": [f"{results['dense']['test']:.1f} / {results['dense']['validation']:.1f} / "
                      f"{results['dense']['out-of-domain']:.1f}"] * len(sizes) + ["-"]}
    for name, cells in results["runs"].items():
        rows[name] = [f"{cells[str(s)]['test']:.1f} / {cells[str(s)]['validation']:.1f} / "
                      f"{cells[str(s)]['out-of-domain']:.1f}" for s in sizes]
        timed = cells.get("0.9", cells[str(sizes[0])]).get("seconds")
        rows[name].append("-" if timed is None else f"{timed:.1f}")
    suffix = "" if args.model == "demo" else "_" + args.model.split(":")[-1]
    name = f"shrink_demo{suffix}{'_heads' if args.heads else ''}{'_' + args.tag if args.tag else ''}"
    save_and_print(args.out, name, results, columns, rows)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
