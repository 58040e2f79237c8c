"""Peak host memory per process of `hf-compress compress` under FSDP with 2 gloo processes, against
1 process, on a published shape with random weights: each FSDP process factorizes its share of
the blocks and receives the rest's rows (issue 24); the score maps must agree.

Each run is a fresh process tree. The largest resident set of any of its processes comes from the
kernel (ru_maxrss over the waited-for children of a parent that runs nothing else); each process
also notes its own peak so far at the end of every stage of the pass (whitening + SVD, pass,
finish), through a runner that wraps the CLI, so a stage's figure is the peak up to its end.

    git worktree add /tmp/before-share c0afc4f   # the commit before the share, measured in the same run
    python bench/fsdp_memory.py --before /tmp/before-share   # about 17 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from common import SHAPES, save_random_model

GIB = 2**30
PEAK_OF = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
RUNNER = """import json, os, resource, sys
import hf_compress.training as training
real, peaks = training.StageMeter.done, {}
def done(self, name):
    real(self, name)
    peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"{os.environ['STAGE_PEAKS']}.{os.environ.get('RANK', '0')}.json", "w") as file:
        json.dump(peaks, file)
training.StageMeter.done = done
from hf_compress.cli import main
sys.argv = ["hf-compress", *sys.argv[1:]]
main()
"""  # a file in the work folder, so that the package imported is the one PYTHONPATH names


def compress(model: Path, out: Path, processes: int, settings: list[str], tree: Path | None = None) -> dict:
    """Seconds, the largest peak resident bytes of any process, and each process's peak at the end
    of each stage of one compress run (FSDP over `processes` gloo processes when more than one;
    the package of another source `tree` if given)."""
    runner = model.parent / "stage_peaks.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes)),
           "STAGE_PEAKS": str(out) + ".stages"}
    if tree:
        env["PYTHONPATH"] = str(tree)
    launcher = [sys.executable]
    if processes > 1:
        env["ACCELERATE_USE_FSDP"] = "true"
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29533"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_OF, *launcher, str(runner), "compress", str(model),
                           "--output", str(out), "--overwrite", *settings],
                          check=True, stdout=subprocess.PIPE, text=True, env=env)
    stages = [json.loads(Path(f"{out}.stages.{rank}.json").read_text()) for rank in range(processes)]
    return {"seconds": round(time.perf_counter() - started, 1), "peak_bytes": int(done.stdout.split()[-1]) * 1024,
            "stage_peak_bytes": {name: max(s[name] for s in stages) for name in stages[0]}}


def scores(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in directory.glob("acip*.safetensors"):
        with safe_open(file, "pt") as tensors:
            found |= {key: tensors.get_tensor(key) for key in tensors.keys() if key.endswith(".score")}
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama3.2-1b")
    parser.add_argument("--blocks", type=int, default=8, help="decoder blocks kept (two FSDP processes fit 24 GB)")
    parser.add_argument("--before", type=Path, help="a source tree of an earlier commit, measured the same way")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fsdp_memory"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    model = args.work / "model"
    if not (model / "config.json").is_file():
        save_random_model(args.shape, model, blocks=args.blocks)
    settings = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "128", "--whitening-windows", "4",
                "--dataset", "builtin:pydoc", "--device", "cpu"]
    report = {"shape": args.shape, "blocks": args.blocks,
              "dense_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")), "runs": {}}
    runs = [("1 process", 1, None), ("2 FSDP processes", 2, None)]
    if args.before:
        runs.append(("2 FSDP processes, before", 2, args.before))
    for name, processes, tree in runs:
        report["runs"][name] = compress(model, args.work / name.replace(" ", "-").replace(",", ""), processes,
                                        settings, tree)
        print(name, report["runs"][name], flush=True)
    maps = {name: scores(args.work / name.replace(" ", "-").replace(",", "")) for name in report["runs"]}
    report["score_maps"] = {}
    for other in list(maps)[1:]:  # each against the first
        a, b = maps[list(maps)[0]], maps[other]
        report["score_maps"][f"{list(maps)[0]} vs {other}"] = {
            "max_difference": max((a[key] - b[key]).abs().max().item() for key in a),
            "same_dead_values": all(torch.equal(a[key] <= 0, b[key] <= 0) for key in a)}
    if args.before:
        a, b = maps["2 FSDP processes"], maps["2 FSDP processes, before"]
        report["score_maps"]["2 FSDP processes vs before"] = {
            "max_difference": max((a[key] - b[key]).abs().max().item() for key in a),
            "same_dead_values": all(torch.equal(a[key] <= 0, b[key] <= 0) for key in a)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fsdp_memory_{args.shape}.json").write_text(json.dumps(report, indent=2))
    dense = report["dense_bytes"]
    for name, run in report["runs"].items():
        stages = ", ".join(f"{stage} {peak / GIB:.2f}" for stage, peak in run["stage_peak_bytes"].items())
        print(f"{name:28s} peak {run['peak_bytes'] / GIB:6.2f} GiB per process ({run['peak_bytes'] / dense:.2f}x "
              f"the dense bytes; by the end of {stages} GiB), {run['seconds']} s")
    for pair, compared in report["score_maps"].items():
        print(f"score maps, {pair}: max difference {compared['max_difference']:.2e}, same dead values: "
              f"{compared['same_dead_values']}")


if __name__ == "__main__":
    main()
