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
    assert set(results["median_step_seconds"]) == {"values", "channels"} and results["channels_over_values"] > 0
