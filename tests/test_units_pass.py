"""One global order over singular values, MLP channels and head groups; compensation; the dense loss."""

import copy
import json

import pytest
import torch

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import AcipConfig, CompressibleModel, HfCompressError, acip
from hf_compress.acip.compensate import compensate
from hf_compress.formats import size_report
from hf_compress.layers import dense_weight


@pytest.fixture(scope="module", params=["llama", "phi3"])
def compressible(request):
    return acip(tiny_model(request.param), tiny_data(), max_steps=12, stop_ratio=0.3, batch_size=4,
                units="all", lora_rank=0, show_progress=False)


def test_the_pass_ranks_channels_and_head_groups(compressible):
    """Phi-3's attention keeps its key/value head count from the config, so blocks cannot differ in it."""
    groups = 0 if compressible.base_model.config.model_type == "phi3" else 2 * 2
    assert compressible.summary["ranked_units"] == {"mlp": 2 * 96, "attention": groups}
    for units in compressible.units.values():
        assert sorted(units.order.tolist()) == list(range(units.ref.units))
        assert (units.score[:-1] >= units.score[1:]).all()


@pytest.mark.parametrize("structure", ["mixed", "channels", "svd"])
def test_every_structure_fits_its_budget_and_removes_only_what_it_may(compressible, structure):
    for ratio in (0.9, 0.6, 0.45):
        model = compressible.materialize(ratio, structure=structure, compensate=False)
        report = size_report(model)
        assert report["target_params"] <= ratio * compressible.dense_params
        assert report["target_params"] >= ratio * compressible.dense_params - 6144  # a head group holds 6,144
        removed = compressible.removed(compressible.plan_at(ratio, structure=structure))
        info = model.config.hf_compress
        if structure == "svd":
            assert removed["mlp_channels"] == removed["head_groups"] == 0 and info["shapes"] == {}
        if structure == "channels":
            assert info["ranks"] == {}
        assert model(tiny_data(2)).logits.isfinite().all()


def test_removing_units_equals_zeroing_their_columns(compressible):
    """Structured removal with nothing refit computes what the dense model computes with the
    removed channels' down columns and the removed groups' o columns set to zero."""
    plan = compressible.plan_at(0.7, structure="channels")
    assert compressible.removed(plan)["mlp_channels"] > 0
    built = compressible.materialize(plan=plan, compensate=False)
    reference = copy.deepcopy(compressible.base_model)
    for name, units in compressible.units.items():
        dropped = units.order[plan.kept[name]:]
        for layer, seg, side in units.ref.segments():
            if side == "in":
                weight = dense_weight(reference.get_submodule(layer))
                columns = (seg.start + dropped[:, None] * seg.per_unit + torch.arange(seg.per_unit)).flatten()
                weight[:, columns] = 0
    data = tiny_data(2, seed=3)
    torch.testing.assert_close(built(data).logits, reference(data).logits, rtol=1e-4, atol=1e-4)


def test_compensation_brings_the_outputs_back_toward_the_dense_model(compressible):
    data = compressible.windows
    dense = compressible.base_model(data).logits.log_softmax(-1)

    def divergence(model):
        return torch.nn.functional.kl_div(model(data).logits.log_softmax(-1), dense, log_target=True,
                                          reduction="batchmean")

    for structure in ("mixed", "svd"):
        raw = compressible.materialize(0.5, structure=structure, compensate=False)
        fitted = compressible.materialize(0.5, structure=structure)
        assert fitted.config.hf_compress["compensated_windows"] == len(data)
        assert divergence(fitted) < divergence(raw)


def test_a_pass_with_lora_is_compensated_only_when_asked():
    """LoRA repairs what the units removed, and a refit toward the dense outputs would undo it."""
    compressible = acip(tiny_model(), tiny_data(), max_steps=6, stop_ratio=0.3, batch_size=4, lora_rank=2,
                        show_progress=False)
    assert "compensated_windows" not in compressible.materialize(0.5).config.hf_compress
    assert compressible.materialize(0.5, compensate=True).config.hf_compress["compensated_windows"] > 0


def test_compensation_is_exact_where_nothing_was_lost():
    """A factorized layer at full rank already computes the dense layer: the refit keeps it."""
    model, dense = tiny_model(), tiny_model()
    from hf_compress.modeling_hf_compress import factorize_

    name = "model.layers.0.self_attn.o_proj"
    weight = dense_weight(dense.get_submodule(name))
    factorize_(model, {name: 64})
    layer = model.get_submodule(name)
    layer.proj_in.weight.data = torch.eye(64)
    layer.proj_out.weight.data = weight.clone() + 0.01 * torch.randn_like(weight)
    compensate(model, dense, tiny_data(8), {name: None}, damping=1e-6, show_progress=False)
    torch.testing.assert_close(layer.proj_out.weight, weight, rtol=1e-3, atol=1e-3)


def test_units_round_trip_and_reload_without_hf_compress(compressible, tmp_path):
    compressible.save_pretrained(tmp_path / "c")
    reloaded = CompressibleModel.from_pretrained(tmp_path / "c")
    assert torch.equal(reloaded.windows, compressible.windows)
    data = tiny_data(2)
    torch.testing.assert_close(reloaded.materialize(0.5)(data).logits, compressible.materialize(0.5)(data).logits)
    meta = json.loads((tmp_path / "c" / "acip.json").read_text())
    assert set(meta["units"]) == set(compressible.units)


def test_units_need_saliency():
    with pytest.raises(HfCompressError, match="ranks singular values only"):
        AcipConfig(objective="acip", units="all")
    assert AcipConfig(objective="acip").units == "values" and AcipConfig().units == "channels"


def test_dense_loss_starts_at_zero_and_ranks():
    """The SVD form at full rank is the dense model, so the KL to it starts at 0."""
    result = acip(tiny_model(), tiny_data(), max_steps=12, stop_ratio=0.3, batch_size=4, loss="dense",
                  show_progress=False)
    assert result.summary["history"][0]["loss"] == pytest.approx(0.0, abs=1e-3)
    assert result.summary["history"][-1]["loss"] > 0


def test_cli_structure_and_info(tmp_path, compressible):
    compressible.save_pretrained(tmp_path / "c")
    code, out, err = run_cli("info", tmp_path / "c")
    assert code == 0 and all(word in out for word in ("MLP", "channels", "head", "groups", "removed"))
    code, _, err = run_cli("materialize", tmp_path / "c", "--size-ratio", "0.6",
                           "--structure", "svd", "--output", tmp_path / "svd")
    assert code == 0, err
    config = json.loads((tmp_path / "svd" / "config.json").read_text())["hf_compress"]
    assert config["shapes"] == {} and config["removed"] == {"mlp_channels": 0, "head_groups": 0}
    code, _, err = run_cli("materialize", tmp_path / "c", "--size-ratio", "0.6",
                           "--structure", "blocks", "--output", tmp_path / "bad")
    assert code == 1 and "structure must be one of" in err and not (tmp_path / "bad").exists()
