"""The benchmark scripts are not tests, but they must not rot: each runs in reduced form on a tiny
checkpoint (the figures they print come from the demo model, docs/BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parents[1] / "bench"


def run_bench(script: str, model: Path, out: Path) -> None:
    subprocess.run([sys.executable, str(BENCH / script), "--quick", "--model", str(model), "--out", str(out)],
                   check=True, capture_output=True)


def test_compare_benchmark_runs_in_reduced_form(tiny_checkpoint, tmp_path):
    run_bench("compare_demo.py", tiny_checkpoint, tmp_path)
    results = json.loads((tmp_path / "compare_demo.json").read_text())
    assert set(results["perplexity"]) >= {"plain SVD, uniform", "whitened SVD, uniform", "ACIP"}
    assert (tmp_path / "compare_demo.png").is_file()


def test_fold_benchmark_runs_in_reduced_form(tiny_checkpoint, tmp_path):
    run_bench("fold_demo.py", tiny_checkpoint, tmp_path)
    results = json.loads((tmp_path / "fold_demo.json").read_text())
    assert {"magnitude pruning", "k-means fold"} <= set(results["perplexity"])
    assert (tmp_path / "fold_demo.png").is_file()


def test_quantize_benchmark_runs_in_reduced_form(tiny_checkpoint, tmp_path):
    run_bench("quantize_demo.py", tiny_checkpoint, tmp_path)
    results = json.loads((tmp_path / "quantize_demo.json").read_text())
    assert {"dense fp32", "dense nf4", "ACIP 0.6 nf4", "fold 0.9 nf4"} <= set(results["results"])
    assert results["results"]["dense nf4"]["bytes"] < 0.4 * results["results"]["dense fp32"]["bytes"]
    assert (tmp_path / "quantize_demo.png").is_file()


def test_step_time_benchmark_runs_in_reduced_form(tiny_checkpoint, tmp_path):
    subprocess.run([sys.executable, str(BENCH / "units_step_time.py"), "--model", str(tiny_checkpoint), "--steps", "4",
                    "--repeats", "1", "--out", str(tmp_path)], check=True, capture_output=True)
    results = json.loads((tmp_path / "units_step_time.json").read_text())
    assert set(results["median_step_seconds"]) == {"values, no LoRA", "default"} and results["default_over_values"] > 0


def test_gpu_check_runs_on_a_tiny_shape_on_cpu(tmp_path):
    """The GPU check's steps, end to end, where CI can run them (the device runs bench/gpu_check.sh)."""
    subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--shape", "tiny", "--device", "cpu", "--steps", "2",
                    "--batch-size", "2", "--seq-len", "64", "--whitening-windows", "4", "--work", str(tmp_path / "work"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert set(report["stages"]) == {"whitening + SVD", "pass"}
    assert report["checkpoints"]["0.8 nf4"]["model_bytes"] < 0.5 * report["checkpoints"]["0.8"]["model_bytes"]
    assert set(report["decode_b1_tokens_per_second"]) == {"dense", "0.6", "0.6 speed-aware"}
    assert all(speed > 0 for speed in report["decode_b1_tokens_per_second"].values())


def test_materialize_memory_benchmark_runs_on_a_tiny_shape(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "materialize_memory.py"), "--shape", "tiny", "--max-memory", "300KB",
                    "--work", str(tmp_path / "work"), "--out", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "materialize_memory_tiny.json").read_text())
    assert set(report["materialize"]) == {"default", "--max-memory 300KB"}
    assert all(run["peak_gib"] > 0 for run in report["materialize"].values())


def test_fsdp_memory_benchmark_runs_on_a_tiny_shape(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "fsdp_memory.py"), "--shape", "tiny", "--blocks", "2",
                    "--work", str(tmp_path / "work"), "--out", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "fsdp_memory_tiny.json").read_text())
    assert set(report["runs"]) == {"1 process", "2 FSDP processes"}
    assert set(report["runs"]["2 FSDP processes"]["stage_peak_bytes"]) == {"whitening_svd", "pass", "finish"}
    (compared,) = report["score_maps"].values()
    assert compared["same_dead_values"] and compared["max_difference"] < 1e-2
