"""SVD parametrization: exact at init on every architecture; targets, patterns and errors."""

import copy

import pytest
import torch

from conftest import ARCHS, tiny_data, tiny_model
from hf_compress import AcipConfig, HfCompressError
from hf_compress.acip.layer import SVDLinear
from hf_compress.acip.train import inject, svd_form
from hf_compress.acip.whitening import block_covariances
from hf_compress.layers import find_targets


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("basis", ["plain", "whitened"])
def test_exact_at_init(arch, basis):
    model = tiny_model(arch)
    data = tiny_data(8)
    reference, names = model(data).logits, list(find_targets(model))
    layers, originals = svd_form(model, data, AcipConfig(basis=basis, lora_rank=2, batch_size=4), "cpu",
                                 show_progress=False)
    assert list(layers) == list(originals) == names
    assert all(isinstance(m, SVDLinear) for m in layers.values())
    assert relative_error(model(data).logits, reference) < 1e-5


def full_forward_covariances(model, data):
    """The reference: every target's input covariance from hooks on one plain forward."""
    sums, handles = {}, []
    for name, module in find_targets(model).items():
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in data.split(4):
            model(batch)
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_covariances_equal_one_forward(arch):
    """Sequential capture gives every layer the covariance a full forward gives it, one per
    shared input (q/k/v, gate/up share theirs), while the caller replaces layers as they come."""
    model, data = tiny_model(arch), tiny_data(8)
    reference = full_forward_covariances(model, data)
    config, seen, groups = AcipConfig(basis="plain"), {}, []
    for names, covariance in block_covariances(model, find_targets(model), list(data.split(4)), False):
        groups.append(names)
        for name in names:
            seen[name] = covariance
        inject(model, config, names)  # replacing a block's layers must not change later blocks' inputs
    assert seen.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(seen[name], reference[name], rtol=1e-4, atol=1e-3)
    if arch == "llama":
        assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                "model.layers.0.self_attn.v_proj"] in groups
        assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
        assert len(groups) == 8  # 4 distinct inputs a block


def test_few_whitening_tokens_warn():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="fewer than the 96 inputs of model.layers.0.mlp.down_proj"):
        svd_form(model, tiny_data(2, seq_len=16), AcipConfig(whitening_windows=2, batch_size=2), "cpu",
                 show_progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_are_the_block_linears(arch):
    model = tiny_model(arch)
    names = list(find_targets(model))
    assert names and not any("embed" in n or "lm_head" in n or "wte" in n for n in names)
    per_block = {"llama": 7, "qwen2": 7, "mistral": 7, "phi3": 4, "gpt2": 4}[arch]
    assert len(names) == 2 * per_block


def test_include_exclude_patterns():
    model = tiny_model("llama")
    attention = find_targets(model, include=r"self_attn")
    assert len(attention) == 8 and all("self_attn" in n for n in attention)
    no_down = find_targets(model, exclude=r"down_proj")
    assert len(no_down) == 12 and not any("down_proj" in n for n in no_down)


def test_unsupported_layer_type_is_an_error():
    with pytest.raises(HfCompressError, match="unsupported layer type LlamaRMSNorm"):
        find_targets(tiny_model("llama"), include=r"input_layernorm")


def test_unsupported_architecture_is_an_error():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 99
    with pytest.raises(HfCompressError, match="unsupported architecture"):
        find_targets(model)


def test_no_match_is_an_error():
    with pytest.raises(HfCompressError, match="no Linear layers"):
        find_targets(tiny_model("llama"), include=r"nothing_like_this")


def test_dead_values_leave_the_computation():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    layer = inject(model, AcipConfig(basis="plain"), [name])[name]
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer.mask[:10] = -torch.arange(1.0, 11.0)  # ten values die in one step, value 9 deepest
        layer.update_scores(layer.mask, layer.mask <= 0, (-layer.mask).clamp(min=0))
    assert layer.rank == 54 and layer.stored[:54].tolist() == list(range(10, 64))
    u, s, vt = layer.factors(torch.arange(10, 64))
    kept = (u * s) @ vt
    assert layer.u.shape == (64, 64)  # the stored factors are reordered in place, not copied
    torch.testing.assert_close(layer(x), x @ kept.t(), rtol=1e-5, atol=1e-5)
    assert (layer.score[:10] < 0).all() and (layer.score[10:] > 0).all()
    assert (layer.score[:10].diff() < 0).all()  # of values dying together, the deepest ranks lowest
    with torch.no_grad():
        layer.mask[10] = -0.001
        layer.update_scores(layer.mask, layer.mask <= 0, (-layer.mask).clamp(min=0))
    assert layer.score[10] > layer.score[:10].max()  # dying later outranks any earlier death
    copy.deepcopy(layer)  # the compacted tensors survive copying
