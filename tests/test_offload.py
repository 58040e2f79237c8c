"""Every command that reads a model past one device's memory: --device-map / --max-memory load it
as Accelerate's big-model loading does (on this CPU-only machine: what does not fit goes to disk),
and each gives what it gives with the model in memory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import COMMON, ok, refused
from hf_compress.formats import disk_bytes

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
    before = {name: block.get_submodule(name)._hf_hook.weights_map for name in ("mlp.up_proj", "mlp.down_proj")}
    with resident(block, keep_changes=True):
        block.mlp.up_proj.weight.data = 2 * block.mlp.up_proj.weight.data
    assert block.mlp.down_proj._hf_hook.weights_map is before["mlp.down_proj"]  # unchanged: not written again
    assert block.mlp.up_proj._hf_hook.weights_map is not before["mlp.up_proj"]
    with resident(block):
        torch.testing.assert_close(block.mlp.up_proj.weight, 2 * before["mlp.up_proj"]["weight"])


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
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def compressible(tmp_path_factory, tokenizer):
    """A pass over a tiny Llama whose output head is tied to its embeddings (offloading must not
    untie them: the checkpoint would hold the embeddings twice)."""
    root = tmp_path_factory.mktemp("offload")
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256, "tie_word_embeddings": True})
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tied")
    tokenizer.save_pretrained(root / "tied")
    ok("compress", root / "tied", "--output", root / "acip", "--max-steps", 4, "--seq-len", 32,
       "--whitening-windows", 4, "--batch-size", 2, "--lora-rank", 0)  # compensated when streamed
    return root / "acip"


@pytest.mark.parametrize("options", [("--size-ratio", 0.6), ("--max-size", "700KB"), ("--size-ratio", 0.5, "--quantize", "nf4")])
def test_materialize_streams_the_base_block_by_block(compressible, tmp_path, options):
    """With --max-memory the dense base stays on disk (in its own files) and each block is rewritten
    and compensated alone; the files are written one 100 KB shard at a time; same weights."""
    from hf_compress import CompressibleModel
    from hf_compress.loading import parse_max_memory

    streamed = CompressibleModel.from_pretrained(compressible, device_map="auto", max_memory=parse_max_memory("10KB"))
    assert set(streamed.base_model.hf_device_map.values()) == {"disk"}  # the embeddings and head too
    shards = ("--max-shard-size", "100KB")
    ok("materialize", compressible, *options, *shards, "--output", tmp_path / "memory")
    ok("materialize", compressible, *options, *shards, "--max-memory", "10KB", "--output", tmp_path / "streamed")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1
    assert_same_weights(tmp_path / "memory", tmp_path / "streamed")  # the head still tied: not stored twice
    if "--max-size" in options:
        assert disk_bytes(tmp_path / "streamed")[0] <= 700_000  # weight files and index, headers included


def test_max_memory_parsing():
    from hf_compress.loading import parse_max_memory

    assert parse_max_memory("8GiB") == {"cpu": 8 * 2**30}
    assert parse_max_memory("cuda:0=20GB, cpu=1GB,1=2GB") == {0: 20 * 10**9, "cpu": 10**9, 1: 2 * 10**9}
