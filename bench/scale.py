"""Time and peak memory of each stage of compress against the memory plan.

On CPU the peak of a stage is the process's resident memory, sampled every 2 ms, minus what it
held before the model was built (large allocations are forced to mmap so freed memory leaves
the count); on a GPU it is torch's peak allocated bytes. Models: the demo, or a real shape cut
to a few decoder blocks with random weights (`--shape llama2-7b --blocks 2`); the plan of the
full-depth model is printed beside it.

    python bench/scale.py --model demo                      # plan check on the demo
    python bench/scale.py --shape llama2-7b --blocks 2 --batch-size 1 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # glibc reads it at start: re-exec with it set
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import hf_compress as hfc  # noqa: E402
from hf_compress.formats import empty_model  # noqa: E402
from hf_compress.plan import meta_model, plan_memory  # noqa: E402

from common import SHAPES  # noqa: E402

GIB = 2**30


class ResidentMemory:
    """Resident bytes of this process, sampled every 2 ms by a thread: `peak(start, end)` is the
    largest sample between two wall-clock times."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.samples: list[tuple[float, int]] = []
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _sample(self):
        while self._running:
            self.samples.append((time.time(), self.rss()))
            time.sleep(0.002)

    def stop(self) -> None:
        self._running = False
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        return max(rss for t, rss in self.samples if start <= t <= end)


def build(args):
    if args.model:
        model, tokenizer = hfc.load_model(args.model, torch.float32)
        data = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=args.seq_len)
        return model, data, meta_model(args.model).config
    config = LlamaConfig(**{**SHAPES[args.shape], "num_hidden_layers": args.blocks})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    data = torch.randint(0, config.vocab_size, (max(args.batch_size * args.steps, args.whitening_windows), args.seq_len))
    return model, data, LlamaConfig(**SHAPES[args.shape])


def dense_step_seconds(model, batch) -> float:
    """One forward+backward of the dense model with weight gradients (a fine-tuning step)."""
    model.requires_grad_(True)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        seconds.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return min(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model hf-compress loads (demo, Hub id, directory)")
    source.add_argument("--shape", choices=SHAPES, help="a published shape with random weights")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--whitening-windows", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    name = args.model or f"{args.shape}-{args.blocks}blocks"

    memory = ResidentMemory()
    baseline = memory.rss()
    started = time.time()
    model, data, full_config = build(args)
    load_seconds = time.time() - started
    load_peak = memory.peak(started, time.time()) - baseline
    meta = empty_model(model.config)
    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, whitening_windows=args.whitening_windows)
    plan = {stage.name: stage for stage in plan_memory(meta, dtype_bytes=4, **settings).stages}

    dense_seconds = dense_step_seconds(model, data[: args.batch_size])
    result = hfc.acip(model, data, max_steps=args.steps, batch_size=args.batch_size, stop_ratio=0.05,
                      whitening_windows=args.whitening_windows, show_progress=True)
    started = time.time()
    result.materialize(0.5)
    materialize_window = (started, time.time())
    memory.stop()

    # The pass reports when each of its stages started and how long it took.
    stages = result.summary["stages"]
    windows, start = {}, stages["started_at"]
    for stage in ("whitening_svd", "pass"):
        windows[stage] = (start, start + stages[stage]["seconds"])
        start = windows[stage][1]
    measured = {"whitening + SVD": memory.peak(*windows["whitening_svd"]) - baseline,
                "pass": memory.peak(*windows["pass"]) - baseline,
                "materialize": memory.peak(*materialize_window) - baseline}
    report = {
        "model": name, "settings": settings, "threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 1),
        "load_peak_gib": round(load_peak / GIB, 3),
        "whitening_svd_seconds": stages["whitening_svd"]["seconds"],
        "first_pass_step_seconds": result.summary["history"][0]["seconds"],
        "dense_forward_backward_seconds": round(dense_seconds, 3),
        "materialize_seconds": round(materialize_window[1] - materialize_window[0], 2),
        "stages": {stage: {"planned_gib": round(plan[stage].device_bytes / GIB, 3),
                           "measured_gib": round(measured[stage] / GIB, 3),
                           "measured_over_planned": round(measured[stage] / plan[stage].device_bytes, 3)}
                   for stage in measured},
    }
    report["first_step_over_dense"] = round(report["first_pass_step_seconds"] / dense_seconds, 2)
    full = empty_model(full_config)
    for dtype_bytes, on_gpu, label in ((2, True, "full depth, bf16 on one GPU"), (4, False, "full depth, fp32 on CPU")):
        full_plan = plan_memory(full, dtype_bytes=dtype_bytes, on_gpu=on_gpu, **settings)
        report.setdefault("plan_full_depth", {})[label] = {
            s.name: {"device_gib": round(s.device_bytes / GIB, 2), "host_gib": round(s.host_bytes / GIB, 2)}
            for s in full_plan.stages}
    print(json.dumps(report, indent=2))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"scale_{name}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
