"""The default pass's step time (units ranked beside singular values, LoRA trained with the
masks) against the pass issue 22 started from (singular values alone, no LoRA), which it bounds
at 1.3x: `make demo`'s settings (4 windows of 128 tokens a step), the same data and seed, steps
timed by the pass itself; the median of each run's steps after the first two, runs of the two
settings alternated so that drift on the machine hits both.

    python bench/units_step_time.py            # demo, about 6 min on 2 cores, nothing else running
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import versions

from common import save_and_print


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    _, tokenizer = hfc.load_model(args.model)
    data = hfc.calibration_data(tokenizer, "builtin", seq_len=128)
    settings = {"values, no LoRA": dict(units="values", lora_rank=0), "default": {}}
    medians: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, overrides in settings.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            cm = hfc.acip(hfc.load_model(args.model)[0], data, max_steps=args.steps, stop_ratio=0.4, batch_size=4,
                          show_progress=False, **overrides)
            steps = [step["seconds"] for step in cm.summary["history"][2:]]
            medians[name].append(statistics.median(steps))
            print(name, f"{time.perf_counter() - start:.0f} s in all, median step {medians[name][-1]:.2f} s",
                  flush=True)
    values, default = (statistics.median(m) for m in medians.values())
    results = {"command": f"python bench/units_step_time.py --model {args.model} --steps {args.steps} "
                          f"--repeats {args.repeats}",
               "versions": versions(), "threads": torch.get_num_threads(), "median_step_seconds": medians,
               "default_over_values": round(default / values, 3)}
    rows = {name: [f"{statistics.median(m):.2f}"] for name, m in medians.items()}
    rows["default / values"] = [f"{default / values:.2f}x"]
    save_and_print(Path(args.out), "units_step_time", results, ["median step seconds"], rows)


if __name__ == "__main__":
    main()
