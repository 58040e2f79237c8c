"""Two CPU processes (gloo, torchrun), under DDP or FSDP, rank singular values (and torque-prune) as one process
does."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ok

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("acip_worker.py")


def run_worker(out: Path, processes: int, **env) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29500 + processes)] if processes > 1 else [sys.executable]
    subprocess.run([*launcher, str(WORKER), str(out)], check=True, env=env, capture_output=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process result of each setting, run once for every test that compares with it."""
    results = {}

    def run(**env) -> dict:
        key = tuple(sorted(env.items()))
        if key not in results:
            results[key] = run_worker(tmp_path_factory.mktemp("one") / "one.pt", 1, **env)
        return copy.deepcopy(results[key])

    return run


OBJECTIVES = "saliency,torque,pmmp"  # its own rule, AdamW, SGD with extra state: one launch runs the three


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("two") / "two.pt", 2, OBJECTIVES=OBJECTIVES)


@pytest.mark.parametrize("objective", OBJECTIVES.split(","))
def test_two_processes_give_the_single_process_score_map(one_process, two_processes, objective):
    single = one_process(OBJECTIVES=OBJECTIVES)[objective]
    double = copy.deepcopy(two_processes[objective])
    assert single["_summary"]["num_processes"] == 1 and double["_summary"]["num_processes"] == 2
    assert double.pop("_rows_held") == 1.0 and single.pop("_rows_held") == 1.0
    assert double.pop("_factorized") == single.pop("_factorized") == 14  # DDP: every process factorizes all
    assert single["_summary"]["steps"] == double["_summary"]["steps"]
    for name, scores in single.items():
        if name != "_summary":
            # Same global batch and seed: gradients differ only by float reduction order.
            torch.testing.assert_close(double[name], scores, rtol=0, atol=1e-4)
            assert torch.equal(double[name] <= 0, scores <= 0)  # the same values died


def test_fsdp_gives_the_single_process_score_map(tmp_path, one_process):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP: blocks sharded with FSDP2, masks whole;
    each process factorizes its share of the blocks and receives the rest's rows."""
    single = one_process(OBJECTIVES=OBJECTIVES)["saliency"]
    sharded = run_worker(tmp_path / "fsdp.pt", 2, ACCELERATE_USE_FSDP="true")["saliency"]
    assert sharded["_summary"]["fsdp"] and not single["_summary"]["fsdp"]
    assert sharded.pop("_rows_held") == 0.5 and single.pop("_rows_held") == 1.0  # U really was sharded
    assert sharded.pop("_factorized") == 7 and single.pop("_factorized") == 14  # each process its block, received the other
    assert single["_summary"]["steps"] == sharded["_summary"]["steps"]
    for name, scores in single.items():
        if name != "_summary":
            torch.testing.assert_close(sharded[name], scores, rtol=0, atol=1e-4)
            assert torch.equal(sharded[name] <= 0, scores <= 0)


def test_two_processes_train_and_prune_under_torque_as_one_does(tmp_path, one_process):
    single = one_process(PRUNE="torque")
    double = run_worker(tmp_path / "two.pt", 2, PRUNE="torque")
    assert single.keys() == double.keys()
    for name, weight in single.items():
        torch.testing.assert_close(double[name], weight, rtol=0, atol=1e-4)


def test_fsdp_pass_from_the_cli_then_materialize_from_disk(tiny_checkpoint, tmp_path):
    """What a user without a GPU runs for FSDP; the sharded pass's output is an ordinary one."""
    out = tmp_path / "acip"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", ACCELERATE_USE_FSDP="true", OMP_NUM_THREADS="1")
    args = ["-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29511, "-m", "hf_compress",
            "compress", tiny_checkpoint, "--output", out, "--max-steps", 3, "--seq-len", 32, "--batch-size", 2,
            "--whitening-windows", 4]
    subprocess.run([sys.executable, *map(str, args)], check=True, capture_output=True, env=env)
    summary = json.loads((out / "acip.json").read_text())["summary"]
    assert summary["fsdp"] and summary["num_processes"] == 2
    ok("materialize", out, "--size-ratio", 0.6, "--output", tmp_path / "m")
    assert json.loads(ok("info", tmp_path / "m", "--json")[0])["size_ratio"] <= 0.6
