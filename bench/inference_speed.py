"""Decode and prefill speed of materialized models, plain and speed-aware, against the dense model
they came from, with the held-out perplexity each costs.

Every round times every model once (interleaved, so a slow spell of a shared machine hits all of
them); each figure is the best of --rounds. Decode: greedy, 48 new tokens after a 32-token prompt
at batch 1 (and 32 at batch 8); prefill: one 512-token forward at batch 1 (256 at batch 8).
"Bytes limit" is dense weight bytes / model weight bytes: the speedup batch-1 decoding would
reach if reading weights were all it did. "Weights-only" times every Linear of the model once at
batch 1 in forward order (what our layers cost), so decode time minus it is what transformers'
loop costs around them (attention, norms, sampling, Python), the same for every size.

    hf-compress compress demo --output runs/acip60 --max-steps 60 --seq-len 128
    python bench/inference_speed.py runs/acip60          # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hf_compress as hfc
from hf_compress.evaluate import perplexity
from hf_compress.layers import tensor_bytes

from common import save_and_print

PROMPT = torch.randint(100, 1000, (8, 512), generator=torch.Generator().manual_seed(0))


def decode_seconds(model, batch: int, new: int) -> float:
    ids = PROMPT[:batch, :32]
    started = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - started


@torch.no_grad()
def prefill_seconds(model, batch: int, length: int) -> float:
    started = time.perf_counter()
    model(input_ids=PROMPT[:batch, :length], use_cache=False)
    return time.perf_counter() - started


@torch.no_grad()
def weights_only_seconds(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = [torch.ones(1, 1, m.in_features) for m in layers]
    started = time.perf_counter()
    for layer, x in zip(layers, inputs):
        F.linear(x, layer.weight, layer.bias)
    return time.perf_counter() - started


MEASURES = {  # name -> (seconds of one run, tokens it produces)
    "decode_b1": (lambda m: decode_seconds(m, 1, 48), 48),
    "decode_b8": (lambda m: decode_seconds(m, 8, 32), 8 * 32),
    "prefill_b1": (lambda m: prefill_seconds(m, 1, 512), None),
    "prefill_b8": (lambda m: prefill_seconds(m, 8, 256), None),
    "weights_only": (weights_only_seconds, None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressible", type=Path)
    parser.add_argument("--ratios", default="0.8,0.6,0.4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--windows", type=int, default=8, help="held-out 512-token windows for perplexity")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    cm = hfc.CompressibleModel.from_pretrained(args.compressible)
    overhead = cm.speed_overhead()
    models = {"dense": cm.base_model}
    for ratio in map(float, args.ratios.split(",")):
        models[f"{ratio}"] = cm.materialize(ratio)
        models[f"{ratio} speed-aware"] = cm.materialize(ratio, speed_aware=overhead)
    windows = hfc.calibration_data(cm.tokenizer, "builtin:pydoc", seq_len=512, split="test", max_windows=args.windows)
    best = {name: dict.fromkeys(MEASURES, float("inf")) for name in models}
    for model in models.values():  # warm-up
        decode_seconds(model, 1, 4)
    for round_ in range(args.rounds):
        for name, model in models.items():
            for measure, (run, _) in MEASURES.items():
                best[name][measure] = min(best[name][measure], run(model))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    dense, dense_bytes = best["dense"], tensor_bytes(cm.base_model)
    results = {"compressible": str(args.compressible), "threads": torch.get_num_threads(), "rounds": args.rounds,
               "speed_overhead_params": overhead, "models": {}}
    rows = {}
    for name, model in models.items():
        seconds = best[name]
        loop = seconds["decode_b1"] / 48 - seconds["weights_only"]
        row = {
            "bytes": tensor_bytes(model),
            "factorized_layers": len(model.config.hf_compress["ranks"]) if hasattr(model.config, "hf_compress") else 0,
            "perplexity": round(perplexity(model, windows)["perplexity"], 3),
            "decode_tokens_per_second": {b: round(n / seconds[f"decode_b{b}"], 2)
                                         for b, n in ((1, MEASURES["decode_b1"][1]), (8, MEASURES["decode_b8"][1]))},
            "prefill_seconds": {b: round(seconds[f"prefill_b{b}"], 3) for b in (1, 8)},
            "weights_only_ms": round(seconds["weights_only"] * 1e3, 2),
            "loop_ms_per_token": round(loop * 1e3, 2),
        }
        row["bytes_limit"] = round(dense_bytes / row["bytes"], 3)
        row["decode_speedup"] = {b: round(dense[f"decode_b{b}"] / seconds[f"decode_b{b}"], 3) for b in (1, 8)}
        row["share_of_bytes_limit_batch1"] = round(row["decode_speedup"][1] / row["bytes_limit"], 3)
        row["weights_only_speedup"] = round(dense["weights_only"] / seconds["weights_only"], 3)
        row["prefill_speedup"] = {b: round(dense[f"prefill_b{b}"] / seconds[f"prefill_b{b}"], 3) for b in (1, 8)}
        results["models"][name] = row
        rows[name] = [f"{row['bytes'] / 2**20:.0f}", str(row["factorized_layers"]), f"{row['perplexity']:.2f}",
                      f"{row['decode_tokens_per_second'][1]:.1f}", f"{row['decode_speedup'][1]:.2f}x",
                      f"{row['bytes_limit']:.2f}x", f"{row['share_of_bytes_limit_batch1']:.0%}",
                      f"{row['weights_only_speedup']:.2f}x", f"{row['decode_speedup'][8]:.2f}x",
                      f"{row['prefill_speedup'][1]:.2f}x", f"{row['prefill_speedup'][8]:.2f}x"]
    save_and_print(args.out, "inference_speed", results,
                   ["MiB", "factorized layers", "held-out ppl", "tok/s b1", "decode b1", "bytes limit",
                    "share of limit", "weights-only", "decode b8", "prefill b1", "prefill b8"], rows)


if __name__ == "__main__":
    main()
