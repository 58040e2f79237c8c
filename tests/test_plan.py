"""The memory plan: from the config alone, monotone in what costs memory, and on the CLI."""

import pytest
from conftest import CONFIGS, run_cli, tiny_model
from hf_compress.formats import empty_model
from hf_compress.plan import meta_model, plan_memory


def meta(arch="llama"):
    return empty_model(CONFIGS[arch]())


def stages(**settings):
    return {stage.name: stage for stage in plan_memory(meta(settings.pop("arch", "llama")), **settings).stages}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_stage_is_planned(arch):
    plan = stages(arch=arch)
    assert list(plan) == ["whitening + SVD", "pass", "materialize"]
    weights = sum(p.numel() for p in tiny_model(arch).parameters()) * 4
    assert all(stage.device_bytes > weights for stage in plan.values())  # the model, and more


def test_memory_grows_with_what_costs_memory():
    base = stages()["pass"].device_bytes
    assert stages(batch_size=8)["pass"].device_bytes > base
    assert stages(seq_len=512)["pass"].device_bytes > base
    assert stages(gradient_checkpointing=False)["pass"].device_bytes > base
    assert stages(lora_rank=16)["pass"].device_bytes > base > stages(lora_rank=0)["pass"].device_bytes
    assert stages(batch_size=4, num_processes=2)["pass"].device_bytes < base  # half the batch each
    assert stages(whitening_windows=64)["whitening + SVD"].device_bytes > stages()["whitening + SVD"].device_bytes


def test_on_a_gpu_the_originals_wait_on_the_host():
    cpu, gpu = stages(), stages(on_gpu=True)
    assert gpu["pass"].device_bytes < cpu["pass"].device_bytes and gpu["pass"].host_bytes > 0
    assert stages(dtype_bytes=2, on_gpu=True)["pass"].device_bytes < gpu["pass"].device_bytes


def test_fsdp_splits_the_pass_over_the_processes_and_keeps_blocks_on_the_host():
    ddp, fsdp = stages(on_gpu=True, num_processes=4), stages(on_gpu=True, num_processes=4, fsdp=True)
    assert fsdp["pass"].device_bytes < ddp["pass"].device_bytes
    assert stages(on_gpu=True, num_processes=8, fsdp=True)["pass"].device_bytes < fsdp["pass"].device_bytes
    assert fsdp["whitening + SVD"].device_bytes < ddp["whitening + SVD"].device_bytes  # one block visits at a time
    assert fsdp["whitening + SVD"].host_bytes > ddp["whitening + SVD"].host_bytes
    more = stages(on_gpu=True, num_processes=8, fsdp=True)["whitening + SVD"].host_bytes
    assert more < fsdp["whitening + SVD"].host_bytes  # each process factorizes its share of the blocks


def test_fits_against_capacity():
    model = meta()
    assert plan_memory(model, capacity_bytes=2**40).fits
    assert not plan_memory(model, capacity_bytes=1024).fits
    assert plan_memory(model).fits is None


def test_meta_model_reads_no_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)  # a config and nothing else
    assert next(meta_model(str(tmp_path)).parameters()).device.type == "meta"


def test_plan_and_dry_run_on_the_cli(tmp_path):
    tiny_model().config.save_pretrained(tmp_path / "model")
    code, _, err = run_cli("plan", tmp_path / "model", "--batch-size", 8)
    assert code in (0, None) and "pass" in err and "fits" in err
    code, _, err = run_cli("plan", tmp_path / "model", "--device", "cuda", "--memory", "1KB")
    assert code in (0, None) and "does not fit" in err
    code, _, err = run_cli("plan", tmp_path / "model", "--num-processes", 2, "--fsdp")
    assert code in (0, None) and "2 process(es) FSDP" in err
    code, _, err = run_cli("compress", tmp_path / "model", "-o", tmp_path / "out", "--dry-run")
    assert code in (0, None) and "whitening + SVD" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli("plan", tmp_path / "missing")
    assert code == 1 and "cannot load model" in err
