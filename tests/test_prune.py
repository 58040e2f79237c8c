"""Structured pruning: which units each method keeps, its scores, errors, and the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, run_cli, tiny_data, tiny_model
from hf_compress import HfCompressError, PruneConfig, prune
from hf_compress.layers import decoder_blocks, dense_weight
from hf_compress.shrink.rewrite import shrink_site
from hf_compress.shrink.selection import Magnitude, activation_scores
from hf_compress.shrink.sites import mlp_site, sites
from hf_compress.shrink import torque
from hf_compress.shrink.torque import UnitGroup, torque_scores


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


def test_magnitude_keeps_the_largest_channels():
    model = tiny_model("llama")
    block = model.model.layers[0]
    site = mlp_site(block)
    norms = torch.cat([dense_weight(block.mlp.gate_proj), dense_weight(block.mlp.up_proj),
                       dense_weight(block.mlp.down_proj).t()], dim=1).norm(dim=1)
    keep = norms.topk(48).indices.sort().values
    expected = dense_weight(block.mlp.up_proj)[keep].clone()
    shrink_site(block, 0, site, 0.5, Magnitude())
    torch.testing.assert_close(dense_weight(block.mlp.up_proj), expected)


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
    table = {(index, site.kind): scores for (index, site), scores in
             activation_scores(model, data, found, batch_size=2, show_progress=False).items()}
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


def test_cli_prune_writes_a_plain_checkpoint_with_a_card(tmp_path, tokenizer):
    tiny_model().save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli("prune", tmp_path / "tiny", "--ratio", 0.5, "--heads-ratio", 0.5,
                           "--seq-len", 32, "--windows", 4, "--output", tmp_path / "pruned")
    assert code in (0, None) and "same architecture, no remote code" in err
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == 48
    assert config["hf_compress"]["dataset"] == "builtin"
    assert "Calibration text: `builtin`, 4 windows of 32 tokens." in (tmp_path / "pruned" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.model.layers[0].mlp.up_proj.out_features == 48


def test_cli_magnitude_prune_needs_no_data_and_bad_input_leaves_nothing(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")  # no tokenizer: magnitude does not read text
    code, _, err = run_cli("prune", tmp_path / "tiny", "--ratio", 0.5, "--method", "magnitude",
                           "--output", tmp_path / "pruned")
    assert code in (0, None), err
    assert "magnitude pruning is data-free" in (tmp_path / "pruned" / "README.md").read_text()
    code, _, err = run_cli("prune", tmp_path / "tiny", "--ratio", 0, "--output", tmp_path / "x")
    assert code == 1 and "ratio must be in (0, 1]" in err and not (tmp_path / "x").exists()


TORQUE = dict(method="torque", max_steps=8, batch_size=2, lr=1e-4, strength=1.0, show_progress=False)


def test_torque_kills_the_units_farthest_from_the_pivot_and_prunes_the_dead_first():
    model, data = tiny_model(), tiny_data(8)
    config = PruneConfig(ratio=0.75, **{k: v for k, v in TORQUE.items() if k != "show_progress"})
    found = sites(model, config)
    importance = activation_scores(model, data, found, batch_size=4, show_progress=False)
    mlp = found[0][2]  # block 0's MLP
    scores = torque_scores(model, data, found, config, lambda: importance, show_progress=False)[0, mlp]
    order = importance[0, mlp].argsort(descending=True)
    assert (scores[order[-10:]] < 0).all() and (scores[order[:10]] > 1).all()  # far ones died, near ones live
    assert (scores > 0).float().mean() >= 0.7  # mostly the units beyond the 72 kept
    pruned = prune(tiny_model(), data, ratio=0.75, **TORQUE)
    assert pruned.config.intermediate_size == 72 and pruned.config.hf_compress["steps"] == 8
    assert pruned.model.layers[0].mlp.down_proj.weight.abs().sum(0).gt(0).all()  # only live units were kept


def test_an_interrupted_torque_run_resumes_and_a_finished_one_is_read_back(tmp_path, monkeypatch, capsys):
    data = tiny_data(8)
    straight = prune(tiny_model(), data, ratio=0.5, **TORQUE)
    real_pull = torque.UnitGroup.pull

    def pull(self, strength, step):
        if step == 6:
            raise KeyboardInterrupt
        real_pull(self, strength, step)

    monkeypatch.setattr(torque.UnitGroup, "pull", pull)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_model(), data, ratio=0.5, progress_dir=tmp_path, save_every=4, **TORQUE)
    monkeypatch.setattr(torque.UnitGroup, "pull", real_pull)
    def no_sweep(*args, **kwargs):
        raise AssertionError("a resumed run has ranked its units already")

    monkeypatch.setattr(torque, "activation_scores", no_sweep)
    resumed = prune(tiny_model(), data, ratio=0.5, progress_dir=tmp_path, save_every=4, **TORQUE)
    assert "resuming the torque run at step 4" in capsys.readouterr().out
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(torque.UnitGroup, "pull", None)  # a finished run trains no more
    again = prune(tiny_model(), data, ratio=0.5, progress_dir=tmp_path, save_every=4, **TORQUE)
    for a, b in zip(straight.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)
    monkeypatch.undo()
    for ratio, windows in ((0.75, data), (0.5, tiny_data(8, seed=2))):  # the run is tied to its ratio and data
        with pytest.raises(HfCompressError, match="other settings or data"):
            prune(tiny_model(), windows, ratio=ratio, progress_dir=tmp_path, save_every=4, **TORQUE)


def test_cli_torque_prune_writes_a_plain_checkpoint_and_removes_its_progress(tmp_path, tokenizer):
    tiny_model("qwen2").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli("prune", tmp_path / "tiny", "--ratio", 0.5, "--heads-ratio", 0.5,
                           "--method", "torque", "--max-steps", 4, "--batch-size", 2, "--seq-len", 32,
                           "--output", tmp_path / "pruned")
    assert code in (0, None), err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert (reloaded.config.intermediate_size, reloaded.config.num_key_value_heads) == (48, 1)
    assert reloaded.config.hf_compress["prune"]["method"] == "torque"
    assert "trained 4 steps of 2 windows under exponential torque" in (tmp_path / "pruned" / "README.md").read_text()
    assert not list(tmp_path.glob(".pruned*"))  # no progress, no temporary directory left


@pytest.mark.parametrize("arch", ARCHS)
def test_a_torque_unit_is_its_rows_and_columns_in_every_layout(arch):
    """Killing unit 1 of each site through its views zeroes exactly its rows and columns (fused
    gate_up / qkv, GPT-2's transposed Conv1D included)."""
    model = tiny_model(arch)
    heads = 0.5 if arch != "gpt2" else 1.0
    for index, _, site in sites(model, PruneConfig(ratio=0.5, heads_ratio=heads)):
        block = model.get_submodule(decoder_blocks(model)[0])[index]
        before = {seg.module: dense_weight(block.get_submodule(seg.module)).detach().clone()
                  for seg in site.reads + site.writes}
        group = UnitGroup.start(block, site, kept=1, importance=torch.arange(site.reads[0].units, 0, -1).float())
        for piece in group.pieces:
            piece.view()[1] = 0
        expected = {path: weight.clone() for path, weight in before.items()}
        for seg in site.reads:
            expected[seg.module][seg.start + seg.per_unit: seg.start + 2 * seg.per_unit] = 0
        for seg in site.writes:
            expected[seg.module][:, seg.start + seg.per_unit: seg.start + 2 * seg.per_unit] = 0
        for path, weight in expected.items():
            assert torch.equal(dense_weight(block.get_submodule(path)), weight), (arch, site.kind, path)
        assert group.norms()[1] == 0 and group.rank[0] == 0 and group.rank[-1] == len(group.rank) - 1
