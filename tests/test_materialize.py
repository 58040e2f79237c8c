"""Materialization at any size, self-contained checkpoints and their round trips."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, tiny_data, tiny_model
from hf_compress import CompressibleModel, acip, load_model
from hf_compress.acip.gates import unit_cost
from hf_compress.checkpoint import save_checkpoint
from hf_compress.errors import HfCompressError
from hf_compress.formats import MODELING_FILE, size_report
from hf_compress.layers import dense_weight


@pytest.fixture(scope="module", params=ARCHS)
def compressible(request):
    return acip(tiny_model(request.param), tiny_data(), max_steps=12, stop_ratio=0.3, batch_size=4,
                lora_rank=2, show_progress=False)


@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.35])
def test_size_is_within_budget(compressible, ratio):
    model = compressible.materialize(ratio)
    report = size_report(model)
    shapes = {name: f.shape for name, f in compressible.layers.items()}
    granularity = max([s.in_features + s.out_features for s in shapes.values()]  # a singular value
                      + [unit_cost(u.ref, shapes) for u in compressible.units.values()])  # a channel or head group
    assert report["target_dense_params"] == compressible.dense_params
    assert ratio * compressible.dense_params - granularity <= report["target_params"]
    assert report["target_params"] <= ratio * compressible.dense_params
    assert report["size_ratio"] == pytest.approx(model.config.hf_compress["size_ratio"], abs=1e-6)
    assert model(tiny_data(2)).logits.isfinite().all()


def test_smaller_ratio_never_keeps_more(compressible):
    previous = None
    for ratio in (1.0, 0.8, 0.6, 0.4, 0.2):
        plan = compressible.plan_at(ratio)
        if previous:
            assert all(plan.ranks[n] <= previous.ranks[n] for n in plan.ranks)
            assert all(plan.kept[n] <= previous.kept[n] for n in plan.kept)
        previous = plan


def test_full_ratio_is_dense_plus_lora(compressible):
    full = compressible.materialize(1.0)
    assert full.config.hf_compress["ranks"] == {}
    for name, factors in compressible.layers.items():
        expected = dense_weight(compressible.base_model.get_submodule(name)) + factors.lora_b @ factors.lora_a
        torch.testing.assert_close(dense_weight(full.get_submodule(name)), expected, rtol=1e-5, atol=1e-6)


def test_compressible_round_trip_in_shards(compressible, tmp_path):
    """Factors and base in files of at most 64 KB (a 70B pass's factors need shards past the
    Hub's per-file limit): an index lists them, and a directory missing one is refused."""
    compressible.save_pretrained(tmp_path / "c", max_shard_size="64KB")
    shards = sorted(p.name for p in (tmp_path / "c").glob("acip-*.safetensors"))
    index = json.loads((tmp_path / "c" / "acip.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    for shard in (tmp_path / "c").glob("*.safetensors"):  # the limit is on tensor data, as transformers counts it
        tensors = load_file(shard)
        assert sum(t.nbytes for t in tensors.values()) <= 64_000 or len(tensors) == 1
    reloaded = CompressibleModel.from_pretrained(tmp_path / "c")  # its singular vectors stay on disk
    reloaded.save_pretrained(tmp_path / "again")  # and are read back whole to save again
    again = CompressibleModel.from_pretrained(tmp_path / "again")
    data = tiny_data(2)
    for model in (reloaded, again):
        torch.testing.assert_close(model.materialize(0.5)(data).logits, compressible.materialize(0.5)(data).logits)
    (tmp_path / "c" / shards[-1]).unlink()
    with pytest.raises(HfCompressError, match="not a complete compressible directory"):
        CompressibleModel.from_pretrained(tmp_path / "c")


def test_checkpoint_loads_with_and_without_remote_code(compressible, tmp_path):
    model = compressible.materialize(0.5)
    assert model.config.hf_compress["ranks"]
    save_checkpoint(model, None, tmp_path / "m")
    assert (tmp_path / "m" / MODELING_FILE).is_file()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"]
    data = tiny_data(2)
    expected = model(data).logits
    ours, _ = load_model(tmp_path / "m")
    assert type(ours).__module__.startswith("hf_compress")  # the package's class, no remote code
    torch.testing.assert_close(ours(data).logits, expected, rtol=0, atol=0)
    torch.save(data, tmp_path / "x.pt")
    # A fresh process in which hf_compress cannot be imported: only torch + transformers.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'm'}", trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load("{tmp_path / 'x.pt'}")).logits, "{tmp_path / 'y.pt'}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_output_is_not_overwritten(compressible, tmp_path):
    from hf_compress import HfCompressError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(HfCompressError, match="already exists"):
        save_checkpoint(compressible.materialize(0.5), None, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_speed_aware_keeps_slow_factorizations_dense_within_budget(compressible, tmp_path):
    overhead = 1000  # weights one extra matmul call costs in time (a tiny model's scale)

    def saves_a_call(name, rank):
        shape = compressible.layers[name].shape
        return rank * (shape.in_features + shape.out_features) + overhead < shape.in_features * shape.out_features

    slow_somewhere = False
    for ratio in (0.95, 0.8, 0.5):
        plain = compressible.materialize(ratio, structure="svd")  # speed matters where layers factorize
        fast = compressible.materialize(ratio, speed_aware=overhead, structure="svd")
        ranks, plain_ranks = fast.config.hf_compress["ranks"], plain.config.hf_compress["ranks"]
        assert fast.config.hf_compress["speed_overhead_params"] == overhead
        slow = [name for name, rank in plain_ranks.items() if not saves_a_call(name, rank)]
        slow_somewhere |= bool(slow)
        assert len(ranks) < len(plain_ranks) if slow else len(ranks) == len(plain_ranks)
        assert all(saves_a_call(name, rank) for name, rank in ranks.items())
        assert size_report(fast)["target_params"] <= ratio * compressible.dense_params
    assert slow_somewhere
    save_checkpoint(fast, None, tmp_path / "m")
    data = tiny_data(2)
    torch.testing.assert_close(load_model(tmp_path / "m")[0](data).logits, fast(data).logits, rtol=0, atol=0)


def test_speed_aware_measures_this_device():
    from hf_compress.speed import call_overhead_params

    assert call_overhead_params("cpu", torch.float32) > 0
    model = acip(tiny_model(), tiny_data(), max_steps=2, batch_size=4, show_progress=False).materialize(
        0.6, speed_aware=True)
    assert model.config.hf_compress["speed_overhead_params"] == call_overhead_params("cpu", torch.float32)


def test_a_pass_over_some_layers_reports_those_layers():
    """`info` (size_report) counts the layers the pass targeted, not every Linear of the blocks."""
    small = acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, include=r"mlp\.", show_progress=False,
                 units="values").materialize(0.5)
    report = size_report(small)
    assert {layer["name"].split(".")[-1] for layer in report["layers"]} == {"gate_proj", "up_proj", "down_proj"}
    assert report["size_ratio"] == pytest.approx(small.config.hf_compress["size_ratio"]) and report["size_ratio"] <= 0.5
