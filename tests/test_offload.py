"""Every command that reads a model past one device's memory: --device-map / --max-memory load it
as Accelerate's big-model loading does (on this CPU-only machine: what does not fit goes to disk),
and each gives what it gives with the model in memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ok, refused

LIMIT = "700KB"  # the tiny checkpoint is 1.3 MB: its embeddings stay in memory, its blocks go to disk


def weights(directory) -> dict:
    return {name: tensor for file in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def assert_same_weights(a, b):
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], msg=name)


def test_the_limit_offloads_blocks_to_disk(tiny_checkpoint):
    from hf_compress.loading import load_model, parse_max_memory
    from hf_compress.offload import input_device, resident

    model, _ = load_model(tiny_checkpoint, device_map="auto", max_memory=parse_max_memory(LIMIT))
    assert {"cpu", "disk"} <= set(model.hf_device_map.values()) and input_device(model) == torch.device("cpu")
    block = model.model.layers[1]
    assert block.mlp.up_proj.weight.device.type == "meta"
    with resident(block):
        assert block.mlp.up_proj.weight.device.type == "cpu" and block.mlp.up_proj.weight.abs().sum() > 0
    assert block.mlp.up_proj.weight.device.type == "meta"


@pytest.mark.parametrize("command", [
    ("fold", "--ratio", 0.5, "--heads-ratio", 0.5, "--layers", "all"),
    ("fold", "--ratio", 0.6),  # the global allocation's trial shrinks read offloaded blocks too
    ("prune", "--ratio", 0.6, "--windows", 4, "--seq-len", 32),
    ("quantize", "--method", "nf4"),
])
def test_a_command_writes_from_an_offloaded_model_what_it_writes_from_memory(tiny_checkpoint, tmp_path, command):
    verb, *options = command
    ok(verb, tiny_checkpoint, *options, "--output", tmp_path / "memory")
    _, err = ok(verb, tiny_checkpoint, *options, "--max-memory", LIMIT, "--output", tmp_path / "offloaded")
    assert_same_weights(tmp_path / "memory", tmp_path / "offloaded")
    config = json.loads((tmp_path / "offloaded" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())


def test_eval_and_info_of_an_offloaded_model(tiny_checkpoint, tmp_path):
    results = {}
    for name, placement in (("memory", ()), ("offloaded", ("--device-map", "sequential", "--max-memory", LIMIT))):
        ok("eval", tiny_checkpoint, "--seq-len", 32, "--max-windows", 4, *placement, "--output", tmp_path / f"{name}.json")
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"][0]["perplexity"]
        results[name + " info"] = json.loads(ok("info", tiny_checkpoint, "--json", *placement)[0])
    assert results["memory"] == pytest.approx(results["offloaded"], rel=1e-5)
    assert results["memory info"] == results["offloaded info"]


def test_what_cannot_spread_says_why(tiny_checkpoint, tmp_path):
    assert "--device-map takes auto" in refused("fold", tiny_checkpoint, "--ratio", 0.5, "--device-map", "everywhere",
                                                "--output", tmp_path / "x")
    assert "--max-memory takes sizes per device" in refused("eval", tiny_checkpoint, "--max-memory", "gpu7=1GB")
    assert "torque trains the model" in refused("prune", tiny_checkpoint, "--ratio", 0.5, "--method", "torque",
                                                "--max-memory", LIMIT, "--output", tmp_path / "x")
    ok("compress", tiny_checkpoint, "--output", tmp_path / "acip", "--max-steps", 1, "--seq-len", 32,
       "--whitening-windows", 2, "--batch-size", 2)
    assert "materializes on one device" in refused("eval", tmp_path / "acip", "--max-memory", LIMIT)
    assert not (tmp_path / "x").exists()


def test_max_memory_parsing():
    from hf_compress.loading import parse_max_memory

    assert parse_max_memory("8GiB") == {"cpu": 8 * 2**30}
    assert parse_max_memory("cuda:0=20GB, cpu=1GB,1=2GB") == {0: 20 * 10**9, "cpu": 10**9, 1: 2 * 10**9}
