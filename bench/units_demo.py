"""One pass that ranks every removable unit (issue 22): the pass's pieces against the strongest
simple methods at the same number of targeted parameters, on the demo or --model demo:gemma3.

Rows, at sizes 0.9 / 0.8 / 0.7 / 0.6 of the targeted Linear parameters:
- dense;
- activation pruning (`prune`'s default: MLP channels of every block, Wanda-sp / FLAP scores from
  one sweep over 64 windows of 256 tokens), its ratio set so the targeted parameters match the size;
  and the same, then fine-tuned with LoRA rank 8 on the pass's tokens (PEFT, as the pass trains its
  own; `pip install -e .[bench]`);
- whitened SVD (SVD-LLM) at the per-layer ranks of the values-only pass;
- the values-only pass (singular values alone, as before units were ranked); `--old-pass DIR`
  adds a row for a pass written by an earlier version (today's pass, as users have it);
- each new piece alone: units (the pass also ranks MLP channels; sizes remove whatever is
  cheapest, no compensation); compensation (values-only pass, compensated); the dense loss
  (values-only pass trained on KL to the dense model); head groups as units too (`--units all`);
- the channels pass compensated (the default; seeds 0, 1, 2 with `--seeds 3`), with structure
  channels, and with the dense loss;
- the channels pass with activation pruning's choice of channels inside its allocation (each
  site's channels reordered by Wanda-sp / FLAP scores on `prune`'s 64 windows; per seed).
- the default pass's model at each size, then fine-tuned as the activation-pruned one is (LoRA 8
  on the pass's tokens; per seed): what a second spend of the same tokens adds at one size.

A rerun measures only the cells the results file lacks (`--remeasure`: all of them). Every pass is
`make demo`'s (60 steps of 4 windows of 128 tokens of `builtin`, stop ratio 0.4;
`--steps 200` for the long one); passes are kept in --runs and read back on a rerun.
Perplexity on 512-token windows: the first --windows of each test split and the last --windows of
each validation split of pydoc, wiki and news (news is in no calibration set).

    python bench/units_demo.py                                   # demo, about 50 min on 2 cores
    python bench/units_demo.py --model demo:gemma3 --rows default,activation,"whitened SVD"
"""

import argparse
import functools
import json
import math
import re
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.acip.compressible import UnitScores
from hf_compress.acip.train import svd_compressible
from hf_compress.evaluate import perplexity, versions
from hf_compress.formats import size_report
from hf_compress.layers import decoder_blocks
from hf_compress.shrink.selection import activation_scores
from hf_compress.shrink.sites import mlp_site
from hf_compress.training import shuffled

from common import save_and_print

HERE = Path(__file__).parent
DOMAINS = ("pydoc", "wiki", "news")
SIZES = (0.9, 0.8, 0.7, 0.6)


def splits(tokenizer, windows: int) -> dict:
    return {f"{split} {domain}": (hfc.calibration_data(tokenizer, f"builtin:{domain}", seq_len=512, split=split)
                                  [:windows] if split == "test" else
                                  hfc.calibration_data(tokenizer, f"builtin:{domain}", seq_len=512, split=split)
                                  [-windows:])
            for split in ("test", "validation") for domain in DOMAINS}


def measure(model, windows: dict) -> dict:
    return {name: round(perplexity(model, w)["perplexity"], 3) for name, w in windows.items()}


class Passes:
    """ACIP passes by settings, run once and kept in `runs`."""

    def __init__(self, args, calibration):
        self.args, self.calibration, self.seconds = args, calibration, {}

    def get(self, units="channels", loss="labels", seed=0, lora_rank=0, lora_lr=5e-4):
        lora = f"_lora{lora_rank}" + ("" if lora_lr == 5e-4 else f"_lr{lora_lr:g}") if lora_rank else ""
        path = Path(self.args.runs) / f"{self.args.model.replace(':', '_')}_{units}_{loss}{lora}_{seed}_{self.args.steps}"
        if not (path / "acip.json").is_file():
            model, _ = hfc.load_model(self.args.model)
            start = time.perf_counter()
            cm = hfc.acip(model, self.calibration, max_steps=self.args.steps, stop_ratio=0.4, batch_size=4,
                          units=units, loss=loss, seed=seed, lora_rank=lora_rank,
                          lora_lr=lora_lr)
            self.seconds[path.name] = time.perf_counter() - start
            cm.save_pretrained(path, overwrite=True)
        return hfc.CompressibleModel.from_pretrained(path)


def activation_ordered(cm: hfc.CompressibleModel, data) -> hfc.CompressibleModel:
    """The pass's allocation (how many channels each site keeps at every size, where they fall in
    the one global order) with activation pruning's choice of which: each site's channels ordered
    by their Wanda-sp / FLAP scores on `data` through the dense base, the pass's scores kept."""
    prefix, _ = decoder_blocks(cm.base_model)
    found = [(int(u.ref.prefix[len(prefix) + 1:].split(".")[0]), 1.0, u.ref.site) for u in cm.units.values()]
    table = activation_scores(cm.base_model, data, found, batch_size=4, show_progress=False)
    for (index, _, site), (name, u) in zip(found, list(cm.units.items())):
        cm.units[name] = UnitScores(u.ref, table[index, site].argsort(descending=True, stable=True), u.score)
    return cm


def activation_pruned(base: str, calibration, size: float):
    """`prune` (activation, MLP channels of every block) at the width whose targeted parameters
    are at most `size`: they are linear in the width, measured once with a data-free prune."""
    dense_model = hfc.load_model(base)[0]
    channels = mlp_site(decoder_blocks(dense_model)[1][0]).reads[0].units
    half = size_report(hfc.prune(dense_model, ratio=0.5, method="magnitude", show_progress=False))["size_ratio"]
    per_channel = (1 - half) / (channels - round(0.5 * channels))
    kept = channels - math.ceil((1 - size) / per_channel - 1e-9)
    return hfc.prune(hfc.load_model(base)[0], calibration, ratio=kept / channels, show_progress=False)


def lora_tuned(model, calibration, steps: int, rank: int = 8, lr: float = 1e-3, seed: int = 0):
    """`model` fine-tuned as the pass trains its LoRA (rank `rank`, AdamW at `lr`, the pass's
    `steps` x 4 windows in the pass's order), with PEFT, merged: what activation pruning gets from
    the same tokens and the same adapter, the baseline that the pass's LoRA must beat."""
    from peft import LoraConfig, get_peft_model  # bench-only dependency (`pip install .[bench]`)

    torch.manual_seed(seed)
    tuned = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    tuned.train()
    for batch in shuffled(calibration, seed)[:steps * 4].split(4):
        tuned(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return tuned.merge_and_unload().eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated sizes to measure")
    parser.add_argument("--rows", default=None, help="comma-separated prefixes of row names, no space after the comma (names contain ', ')")
    parser.add_argument("--remeasure", action="store_true", help="measure cells the results file already has")
    parser.add_argument("--old-pass", default=None, help="a compressible directory from an earlier version")
    parser.add_argument("--runs", default=str(HERE / "runs"))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer = hfc.load_model(args.model)
    calibration = hfc.calibration_data(tokenizer, "builtin", seq_len=128)
    prune_data = hfc.calibration_data(tokenizer, "builtin", seq_len=256, max_windows=64)  # `prune`'s defaults
    windows = splits(tokenizer, args.windows)
    passes = Passes(args, calibration)

    def values_pass():
        return passes.get(units="values")

    @functools.cache
    def whitened_svd():
        return svd_compressible(hfc.load_model(args.model)[0], calibration)

    def whitened(size):
        return whitened_svd().materialize(plan=values_pass().plan_at(size, structure="svd").ranks)

    def old(size):
        cm = hfc.CompressibleModel.from_pretrained(args.old_pass)
        return cm.materialize(size, structure="svd", compensate=False)

    rows = {
        "activation pruning, same parameters": lambda s: activation_pruned(args.model, prune_data, s),
        "activation pruning + LoRA 8 on the pass's tokens": lambda s: lora_tuned(
            activation_pruned(args.model, prune_data, s), calibration, args.steps),
        "whitened SVD at the values pass's allocation": whitened,
        "values pass (singular values only)": lambda s: values_pass().materialize(s, structure="svd", compensate=False),
        "units alone (channels pass, mixed, no compensation)": lambda s: passes.get().materialize(s, compensate=False),
        "head groups too (all-units pass, mixed, compensated)": lambda s: passes.get(units="all").materialize(s),
        "compensation alone (values pass)": lambda s: values_pass().materialize(s, structure="svd"),
        "dense loss alone (values pass)": lambda s: passes.get(units="values", loss="dense").materialize(
            s, structure="svd", compensate=False),
        "channels pass + compensation, structure channels": lambda s: passes.get().materialize(s, structure="channels"),
        "channels pass + dense loss + compensation": lambda s: passes.get(loss="dense").materialize(s),
        "channels pass + LoRA 8, learning rate 5e-4": lambda s: passes.get(lora_rank=8).materialize(s),
        "channels pass + LoRA 8, learning rate 5e-4, compensated": lambda s: passes.get(lora_rank=8).materialize(
            s, compensate=True),
        "channels pass + LoRA 16, learning rate 5e-4": lambda s: passes.get(lora_rank=16).materialize(s),
        "channels pass + LoRA 8, learning rate 2e-3": lambda s: passes.get(lora_rank=8, lora_lr=2e-3).materialize(s),
        "channels pass + LoRA 8 + dense loss": lambda s: passes.get(lora_rank=8, lora_lr=1e-3, loss="dense").materialize(s),
        "channels pass + LoRA 8, learning rate 3e-4": lambda s: passes.get(lora_rank=8, lora_lr=3e-4).materialize(s),
    }
    rows |= {f"channels pass + compensation (seed {seed})": lambda s, seed=seed: passes.get(seed=seed).materialize(s)
             for seed in range(args.seeds)}
    default_lr = hfc.AcipConfig(max_steps=args.steps).adapter_learning_rate
    rows |= {f"default: channels pass + LoRA 8 (seed {seed})":
             lambda s, seed=seed: passes.get(seed=seed, lora_rank=8, lora_lr=default_lr).materialize(s)
             for seed in range(args.seeds)}
    rows |= {f"default + LoRA 8 fine-tuned at the size (seed {seed})":
             lambda s, seed=seed: lora_tuned(passes.get(seed=seed, lora_rank=8, lora_lr=default_lr).materialize(s),
                                             calibration, args.steps, seed=seed)
             for seed in range(args.seeds)}
    rows |= {f"channels pass + compensation, activation order (seed {seed})":
             lambda s, seed=seed: activation_ordered(passes.get(seed=seed), prune_data).materialize(s)
             for seed in range(args.seeds)}
    if args.old_pass:
        rows["pass before units (this repo's previous version)"] = old
    if args.rows:  # in the order asked for
        rows = {name: fn for w in re.split(r",(?! )", args.rows) for name, fn in rows.items() if name.startswith(w)}

    tag = "" if args.model == "demo" else "_" + args.model.replace("demo:", "")
    out = Path(args.out)
    path = out / f"units_demo{tag}_{args.steps}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v not in (None, False)]
    results |= {"command": "python bench/units_demo.py " + " ".join(flags), "versions": versions()}
    if "dense" not in results or args.remeasure:
        results["dense"] = measure(dense, windows)
    results.setdefault("rows", {})
    for name, make in rows.items():
        for size in map(float, args.sizes.split(",")):
            if str(size) in results["rows"].get(name, {}) and not args.remeasure:
                continue  # measured by an earlier run of the same command
            start = time.perf_counter()
            model = make(size)
            seconds = time.perf_counter() - start
            cell = measure(model, windows) | {"size_ratio": size_report(model)["size_ratio"],
                                               "seconds": round(seconds, 1),
                                               "removed": (model.config.hf_compress or {}).get("removed")}
            results["rows"].setdefault(name, {})[str(size)] = cell
            print(name, size, cell, flush=True)
            results["pass_seconds"] = {**results.get("pass_seconds", {}), **passes.seconds}
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    columns = [f"{s} ({d})" for s in SIZES for d in DOMAINS]
    table = {name: [str(cells.get(str(s), {}).get(f"test {d}", "-")) for s in SIZES for d in DOMAINS]
             for name, cells in results["rows"].items()}
    save_and_print(out, path.stem, results, columns, table)


if __name__ == "__main__":
    main()
