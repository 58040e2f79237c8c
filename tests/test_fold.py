"""Folding: exact on duplicated units, valid shapes and configs, reload, schedules, errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ARCHS, tiny_data, tiny_model
from hf_compress import FoldConfig, HfCompressError, acip, fold, load_model
from hf_compress.checkpoint import save_checkpoint
from hf_compress.formats import MODELING_FILE, size_report
from hf_compress.layers import dense_weight, set_dense_weight
from hf_compress.shrink.kmeans import KMeansFold, kmeans
from hf_compress.shrink.rewrite import shrink_site
from hf_compress.shrink.sites import attention_site, mlp_site


@torch.no_grad()
def duplicate_units(block, site):
    """Make the second half of the units copies of the first half (rows, biases and columns)."""
    half = site.reads[0].units // 2
    for seg in site.reads:
        module = block.get_submodule(seg.module)
        weight = dense_weight(module).clone()
        a, b = seg.start, seg.start + half * seg.per_unit
        weight[b: b + half * seg.per_unit] = weight[a: a + half * seg.per_unit]
        set_dense_weight(module, weight)
        if module.bias is not None:
            module.bias[b: b + half * seg.per_unit] = module.bias[a: a + half * seg.per_unit].clone()
    for seg in site.writes:
        module = block.get_submodule(seg.module)
        weight = dense_weight(module).clone()
        a, b = seg.start, seg.start + half * seg.per_unit
        weight[:, b: b + half * seg.per_unit] = weight[:, a: a + half * seg.per_unit]
        set_dense_weight(module, weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_duplicated_channels_is_exact(arch):
    model = tiny_model(arch)
    for block in model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h:
        duplicate_units(block, mlp_site(block))
    data = tiny_data(2)
    reference = model(data).logits
    fold(model, ratio=0.5, show_progress=False)
    torch.testing.assert_close(model(data).logits, reference, rtol=1e-4, atol=1e-4)
    assert size_report(model)["size_ratio"] < 0.8


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_folding_duplicated_head_groups_is_exact(arch):
    model = tiny_model(arch)
    for block in model.model.layers:
        duplicate_units(block, attention_site(block, model.config))
    data = tiny_data(2)
    reference = model(data).logits
    fold(model, ratio=1.0, heads_ratio=0.5, layers="all", show_progress=False)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)  # GQA kept
    torch.testing.assert_close(model(data).logits, reference, rtol=1e-4, atol=1e-4)


def test_uniform_fold_keeps_the_architecture_and_reloads_without_remote_code(tmp_path):
    model = fold(tiny_model("llama"), ratio=0.75, heads_ratio=0.5, layers="all", show_progress=False)
    assert model.config.intermediate_size == 72 and model.config.head_dim == 16
    save_checkpoint(model, None, tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "f" / MODELING_FILE).exists()
    data = tiny_data(2)
    torch.save(data, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'f'}").eval()  # no remote code
        with torch.no_grad():
            torch.save(model(torch.load("{tmp_path / 'x.pt'}")).logits, "{tmp_path / 'y.pt'}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(data).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_per_layer_schedule_is_self_contained(arch, tmp_path):
    model = fold(tiny_model(arch), ratio=0.5, layers=[1], show_progress=False)
    assert model.config.hf_compress["shapes"]
    save_checkpoint(model, None, tmp_path / "f")
    data = tiny_data(2)
    ours, _ = load_model(tmp_path / "f")
    torch.testing.assert_close(ours(data).logits, model(data).logits, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "f", trust_remote_code=True)
    torch.testing.assert_close(remote(data).logits, model(data).logits, rtol=0, atol=0)


def test_info_reports_folded_sizes_against_the_original():
    original = size_report(tiny_model("llama"))
    report = size_report(fold(tiny_model("llama"), ratio=0.5, show_progress=False))
    assert report["target_dense_params"] == original["target_dense_params"]
    assert report["target_params"] < original["target_params"] and report["size_ratio"] < 0.8


def test_schedules():
    assert FoldConfig().layers == "global"  # every block a candidate; allocate.py decides
    assert FoldConfig(ratio=0.8).schedule(3) == dict.fromkeys(range(3), 0.8)
    assert FoldConfig(ratio=0.8, layers="middle").schedule(30) == dict.fromkeys(range(2, 28), 0.8)
    assert FoldConfig(ratio=0.8, layers="middle").schedule(2) == {0: 0.8, 1: 0.8}  # too few blocks to spare any
    assert FoldConfig(ratio=0.8, layers="all").schedule(4) == dict.fromkeys(range(4), 0.8)
    assert FoldConfig(ratio=0.8, layers=[3, 1]).schedule(4) == {1: 0.8, 3: 0.8}
    assert FoldConfig(layers={"2": 0.5, 0: 0.9}).schedule(4) == {0: 0.9, 2: 0.5}


def test_per_block_ratios():
    model = fold(tiny_model("llama"), layers={0: 0.5, 1: 0.75}, show_progress=False)
    assert [block.mlp.up_proj.out_features for block in model.model.layers] == [48, 72]
    assert model.config.intermediate_size == 96 and model.config.hf_compress["shapes"]


def test_a_cluster_merges_rows_by_output_weighted_mean_and_sums_columns():
    block = tiny_model("llama").model.layers[0]
    up, down = dense_weight(block.mlp.up_proj).clone(), dense_weight(block.mlp.down_proj).clone()
    weights = down.pow(2).sum(0)  # each channel's output column, squared norm
    shrink_site(block, 0, mlp_site(block), 1e-3, KMeansFold(FoldConfig()))  # every channel into one
    torch.testing.assert_close(dense_weight(block.mlp.up_proj)[0], weights @ up / weights.sum())
    torch.testing.assert_close(dense_weight(block.mlp.down_proj)[:, 0], down.sum(1))


def test_kmeans_is_deterministic_and_fills_every_cluster():
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    labels = kmeans(points, 250, seed=3)
    assert torch.equal(labels, kmeans(points, 250, seed=3))
    assert torch.bincount(labels, minlength=250).min() >= 1


@pytest.mark.parametrize("layers", ["all", [1]])
def test_acip_on_a_folded_model(layers, tmp_path):
    folded = fold(tiny_model("llama"), ratio=0.75, layers=layers, show_progress=False)
    result = acip(folded, tiny_data(), max_steps=6, batch_size=4, show_progress=False)
    small = result.materialize(0.5)
    assert small.config.hf_compress["fold"]["ratio"] == 0.75 and small.config.hf_compress["ranks"]
    save_checkpoint(small, None, tmp_path / "s")
    data = tiny_data(2)
    torch.testing.assert_close(load_model(tmp_path / "s")[0](data).logits, small(data).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ratio=0), "ratio must be in"), (dict(heads_ratio=1.5), "heads ratio must be in"),
    (dict(layers=[5]), "block indices"),
    (dict(layers="edges"), "fold layers must be one of"), (dict(layers={0: 1.5}), "ratio of block 0"),
])
def test_bad_fold_settings(kwargs, message):
    with pytest.raises(HfCompressError, match=message):
        fold(tiny_model("llama"), show_progress=False, **kwargs)


def test_a_factorized_model_cannot_be_folded():
    small = acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, show_progress=False).materialize(0.5)
    with pytest.raises(HfCompressError, match="fold first, then compress"):
        fold(small, show_progress=False)


def test_gpt2_heads_cannot_be_folded():
    with pytest.raises(HfCompressError, match="cannot fold attention heads of GPT2Block"):
        fold(tiny_model("gpt2"), heads_ratio=0.5, show_progress=False)
