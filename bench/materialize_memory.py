"""Peak host memory of `hf-compress materialize` against the dense model's bytes, on a published shape
with random weights (issue 24 asks for at most 0.5x; this measures where it stands).

A one-step pass makes the compressible directory (its order is meaningless, its files are real);
each materialization then runs as a fresh `hf-compress` process, whose peak resident memory the
kernel reports (ru_maxrss of a parent that runs nothing else).

    git worktree add /tmp/before 5f61d60   # the commit before streaming, measured in the same run
    python bench/materialize_memory.py --shape llama3.2-1b --before /tmp/before   # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import SHAPES, save_random_model

GIB = 2**30


PEAK_OF = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # a parent of this one command only


def hf_compress(*args, tree: Path | None = None) -> tuple[float, int]:
    """Seconds and peak resident bytes of one `hf-compress ARGS` process (the package of another
    source `tree` if given)."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_OF, sys.executable, "-m", "hf_compress", *map(str, args)],
                          check=True, stdout=subprocess.PIPE, text=True, env=env)
    return round(time.perf_counter() - started, 1), int(done.stdout.split()[-1]) * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama3.2-1b")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--max-memory", default="500MB", help="the streamed run's limit (and its shard size)")
    parser.add_argument("--before", type=Path, help="a source tree of an earlier commit, measured the same way")
    parser.add_argument("--work", type=Path, default=Path("/tmp/materialize_memory"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    model = args.work / "model"
    compress_seconds = None
    if not (args.work / "acip" / "acip.json").is_file():  # made once per work folder
        save_random_model(args.shape, model)
        compress_seconds, _ = hf_compress("compress", model, "--output", args.work / "acip", "--max-steps", 1,
                                          "--batch-size", 2, "--seq-len", 128, "--whitening-windows", 4, "--dataset",
                                          "builtin:pydoc", "--device", "cpu", "--overwrite")
    dense_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    factor_bytes = sum(f.stat().st_size for f in (args.work / "acip").glob("acip*.safetensors"))
    report = {"shape": args.shape, "dense_bytes": dense_bytes, "factor_bytes": factor_bytes,
              "compress_seconds": compress_seconds, "materialize": {}}
    runs = {"default": ((), None), f"--max-memory {args.max_memory}": (
        ("--max-memory", args.max_memory, "--max-shard-size", args.max_memory), None)}
    if args.before:
        runs[f"before ({args.before})"] = ((), args.before)
    for name, (options, tree) in runs.items():
        seconds, peak = hf_compress("materialize", args.work / "acip", "--size-ratio", args.ratio, *options, "--output",
                                    args.work / "m", "--device", "cpu", "--overwrite", tree=tree)
        report["materialize"][name] = {"seconds": seconds, "peak_gib": round(peak / GIB, 2),
                                       "peak_over_dense": round(peak / dense_bytes, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"materialize_memory_{args.shape}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
