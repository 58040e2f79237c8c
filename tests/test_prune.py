"""Structured pruning: which units each method keeps, its scores, errors, and the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import HfCompressError, PruneConfig, prune
from hf_compress.models import dense_weight
from hf_compress.prune.model import activation_scores
from hf_compress.units import sites


@torch.no_grad()
def silence_channel(model, channel: int, boost: float = 10.0):
    """Channel `channel` of block 0 gets large input rows but a zero output column: weights alone
    rank it first, its contribution to the block's output is nothing."""
    mlp = model.model.layers[0].mlp
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[channel] *= boost
    mlp.down_proj.weight[:, channel] = 0


def kept_rows(model) -> torch.Tensor:
    return dense_weight(model.model.layers[0].mlp.up_proj)


def test_activation_drops_what_never_reaches_the_output_and_magnitude_keeps_it():
    data = tiny_data(4)
    by_weights, by_activations = tiny_model(), tiny_model()
    for model in (by_weights, by_activations):
        silence_channel(model, 5)
    row = by_weights.model.layers[0].mlp.up_proj.weight[5].clone()
    prune(by_weights, config=PruneConfig(ratio=0.5, method="magnitude"), show_progress=False)
    prune(by_activations, data, ratio=0.5, show_progress=False)
    assert torch.isclose(kept_rows(by_weights), row).all(1).any()
    assert not torch.isclose(kept_rows(by_activations), row).all(1).any()


def test_activation_scores_are_weights_times_input_norms():
    model, data = tiny_model(), tiny_data(4)
    found = sites(model, PruneConfig(ratio=0.5, heads_ratio=0.5))
    table = activation_scores(model, data, found, batch_size=2, show_progress=False)
    seen = {}
    block = model.model.layers[1]
    hooks = [block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp", []).append(a[0])),
             block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn", []).append(a[0]))]
    with torch.no_grad():
        model(data)
    for hook in hooks:
        hook.remove()
    mlp_inputs = torch.cat(seen["mlp"]).reshape(-1, 96)
    expected = block.mlp.down_proj.weight.abs().sum(0) * mlp_inputs.norm(dim=0)
    torch.testing.assert_close(table[1, "mlp"], expected, rtol=1e-4, atol=1e-6)
    attn_inputs = torch.cat(seen["attn"]).reshape(-1, 64)
    per_column = block.self_attn.o_proj.weight.abs().sum(0) * attn_inputs.norm(dim=0)
    torch.testing.assert_close(table[1, "attention"], per_column.reshape(2, 32).sum(1), rtol=1e-4, atol=1e-6)


def test_uniform_prune_keeps_the_architecture():
    model = prune(tiny_model("qwen2"), tiny_data(4), ratio=0.75, heads_ratio=0.5, show_progress=False)
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (72, 2, 1)
    assert config.hf_compress["method"] == "prune" and config.hf_compress["windows"] == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="torque-ish"), "prune method must be one of"), (dict(ratio=1.5), "ratio must be in"),
    (dict(layers=[7]), "prune layers must be block indices"),
])
def test_bad_prune_settings(kwargs, message):
    with pytest.raises(HfCompressError, match=message):
        prune(tiny_model(), tiny_data(2), show_progress=False, **kwargs)


def test_activation_needs_data():
    with pytest.raises(HfCompressError, match="needs calibration windows"):
        prune(tiny_model(), None, ratio=0.5, show_progress=False)


def test_cli_prune_writes_a_plain_checkpoint_with_a_card(monkeypatch, capsys, tmp_path, tokenizer):
    tiny_model().save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "tiny", "--ratio", 0.5, "--heads-ratio", 0.5,
                           "--seq-len", 32, "--windows", 4, "--output", tmp_path / "pruned")
    assert code in (0, None) and "same architecture, no remote code" in err
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == 48
    assert config["hf_compress"]["dataset"] == "builtin"
    assert "Calibration text: `builtin`, 4 windows of 32 tokens." in (tmp_path / "pruned" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.model.layers[0].mlp.up_proj.out_features == 48


def test_cli_magnitude_prune_needs_no_data_and_bad_input_leaves_nothing(monkeypatch, capsys, tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")  # no tokenizer: magnitude does not read text
    code, _, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "tiny", "--ratio", 0.5, "--method", "magnitude",
                           "--output", tmp_path / "pruned")
    assert code in (0, None), err
    assert "magnitude pruning is data-free" in (tmp_path / "pruned" / "README.md").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "tiny", "--ratio", 0, "--output", tmp_path / "x")
    assert code == 1 and "ratio must be in (0, 1]" in err and not (tmp_path / "x").exists()
