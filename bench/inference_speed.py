"""Decode and prefill speed of materialized models against the dense model they came from.

For each size: greedy decoding of 64 new tokens after a 32-token prompt (tokens/s, batch 1 and
8) and the latency of one 512-token prefill (batch 1 and 8). The "bytes limit" is the speedup
that reading fewer weight bytes per token would allow (dense bytes / model bytes): batch-1
decoding on a CPU is bound by those reads, so a model that reaches most of it wastes little.

    hf-compress compress demo --output runs/acip60 --max-steps 60 --seq-len 128
    python bench/inference_speed.py runs/acip60
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hf_compress import CompressibleModel
from hf_compress.models import tensor_bytes


def decode_tokens_per_second(model, batch: int, prompt: int = 32, new: int = 64, repeats: int = 3) -> float:
    ids = torch.randint(100, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        best = max(best, batch * new / (time.perf_counter() - started))
    return best


@torch.no_grad()
def prefill_seconds(model, batch: int, length: int = 512, repeats: int = 3) -> float:
    ids = torch.randint(100, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        best = min(best, time.perf_counter() - started)
    return best


def measure(model) -> dict:
    model.eval()
    return {"bytes": tensor_bytes(model),
            "decode_tokens_per_second": {b: round(decode_tokens_per_second(model, b), 2) for b in (1, 8)},
            "prefill_seconds": {b: round(prefill_seconds(model, b), 3) for b in (1, 8)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressible", type=Path)
    parser.add_argument("--ratios", default="0.8,0.6,0.4")
    parser.add_argument("--speed-aware", action="store_true", help="materialize with speed_aware=True too")
    parser.add_argument("--output", type=Path, default=Path("bench/results/inference_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    compressible = CompressibleModel.from_pretrained(args.compressible)
    rows = {"dense": measure(compressible.base_model)}
    dense = rows["dense"]
    for ratio in map(float, args.ratios.split(",")):
        variants = {f"{ratio}": {}}
        if args.speed_aware:
            variants[f"{ratio} speed-aware"] = {"speed_aware": True}
        for name, options in variants.items():
            rows[name] = measure(compressible.materialize(ratio, **options))
    for row in rows.values():
        row["bytes_limit"] = round(dense["bytes"] / row["bytes"], 3)
        row["decode_speedup"] = {b: round(row["decode_tokens_per_second"][b] / dense["decode_tokens_per_second"][b], 3)
                                 for b in (1, 8)}
        row["share_of_bytes_limit_batch1"] = round(row["decode_speedup"][1] / row["bytes_limit"], 3)
        row["prefill_speedup"] = {b: round(dense["prefill_seconds"][b] / row["prefill_seconds"][b], 3) for b in (1, 8)}
    report = {"compressible": str(args.compressible), "threads": torch.get_num_threads(), "models": rows}
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
