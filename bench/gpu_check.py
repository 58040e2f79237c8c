"""The GPU check: a model of a published shape with random weights, through what a user runs on one
GPU, against the memory plan.

Steps: build the model (bf16 on the GPU) and save it with a word-level tokenizer; the plan of a
pass at --batch-size x --seq-len; `hf-compress compress` for --steps steps (its stages' GPU peaks
are in acip.json); `hf-compress materialize` at 0.8, plain and nf4, each reloaded from disk and
evaluated on the GPU (perplexity of pydoc's test windows: a random model scores about its
vocabulary size, so this checks that it runs, not quality); batch-1 greedy decode of the dense
model and of 0.6 plain and speed-aware. Everything lands in one JSON file.

    bash bench/gpu_check.sh                                    # on the device (see the script)
    python bench/gpu_check.py --shape tiny --device cpu --out /tmp/check   # the same steps in seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.cli import app
from hf_compress.plan import meta_model, plan_memory

from common import SHAPES, save_random_model

STAGES = {"whitening_svd": "whitening + SVD", "pass": "pass"}  # acip.json's names -> the plan's
GIB = 2**30


def cli(*args) -> float:
    """Run `hf-compress ARGS` (in this process: the pass reports its stages' GPU peaks itself); its
    wall-clock seconds."""
    started = time.perf_counter()
    app([str(arg) for arg in args], standalone_mode=False)
    return round(time.perf_counter() - started, 1)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tokens_per_second(model, device: str, new: int = 64) -> float:
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0)
    model.generate(ids, **{**generate, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(device)
    started = time.perf_counter()
    model.generate(ids, **generate)
    sync(device)
    return round(new / (time.perf_counter() - started), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--blocks", type=int, help="decoder blocks (default: the shape's own)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--whitening-windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    work = args.work
    report = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": dtype_name, "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")}}

    started = time.perf_counter()
    config = save_random_model(args.shape, work / "model", args.blocks, dtype, args.device)
    report["build_and_save_seconds"] = round(time.perf_counter() - started, 1)
    report["params"] = sum(p.numel() for p in meta_model(str(work / "model")).parameters())

    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, whitening_windows=args.whitening_windows)
    plan = plan_memory(meta_model(str(work / "model")), dtype_bytes=dtype.itemsize,
                       on_gpu=args.device.startswith("cuda"), **settings)
    planned = {stage.name: stage.device_bytes for stage in plan.stages}

    device = () if args.device.startswith("cuda") else ("--device", "cpu")
    report["compress_seconds"] = cli(
        "compress", work / "model", "--output", work / "acip", "--max-steps", args.steps, "--batch-size",
        args.batch_size, "--seq-len", args.seq_len, "--whitening-windows", args.whitening_windows, "--dataset",
        "builtin:pydoc", "--dtype", dtype_name, "--overwrite", *device)
    summary = json.loads((work / "acip" / "acip.json").read_text())["summary"]
    report["stages"] = {}
    for name, plan_name in STAGES.items():
        stage = summary["stages"][name]
        measured = stage.get("peak_bytes")
        report["stages"][plan_name] = {
            "seconds": stage["seconds"], "planned_gib": round(planned[plan_name] / GIB, 2),
            **({"measured_gib": round(measured / GIB, 2), "measured_over_planned": round(measured / planned[plan_name], 3)}
               if measured else {})}

    report["checkpoints"] = {}
    for name, extra in (("0.8", ()), ("0.8 nf4", ("--quantize", "nf4"))):
        out = work / name.replace(" ", "_")
        seconds = cli("materialize", work / "acip", "--size-ratio", 0.8, *extra, "--output", out, "--overwrite",
                      "--dtype", dtype_name, *device)
        eval_seconds = cli("eval", out, "--max-windows", 8, "--seq-len", min(args.seq_len, 512), "--output",
                           work / f"{out.name}.json", "--dtype", dtype_name, *device)
        record = json.loads((work / f"{out.name}.json").read_text())["results"][0]
        report["checkpoints"][name] = {"materialize_seconds": seconds, "eval_seconds": eval_seconds,
                                       "perplexity": record["perplexity"], "model_bytes": record["model_bytes"]}

    compressible = hfc.CompressibleModel.from_pretrained(work / "acip").to(args.device, dtype)
    models = {"dense": lambda: compressible.base_model,
              "0.6": lambda: compressible.materialize(0.6),
              "0.6 speed-aware": lambda: compressible.materialize(0.6, speed_aware=True)}
    report["decode_b1_tokens_per_second"] = {name: decode_tokens_per_second(build(), args.device)
                                             for name, build in models.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"gpu_check_{args.shape}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {target}; vocabulary {config.vocab_size}")


if __name__ == "__main__":
    main()
