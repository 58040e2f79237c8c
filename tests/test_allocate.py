"""The global allocation: one ranking across blocks, from each block's measured output error."""

import pytest
import torch

from conftest import tiny_data, tiny_model
from hf_compress import fold, load_model, prune
from hf_compress.shrink.allocate import random_windows
from hf_compress.checkpoint import save_checkpoint
from hf_compress.layers import decoder_blocks, layer_shape
from hf_compress.shrink.sites import mlp_site
from test_architectures import build
from test_fold import duplicate_units


def widths(model) -> list[int]:
    return [layer_shape(block.mlp.up_proj).out_features for block in decoder_blocks(model)[1]]


@pytest.mark.parametrize("shrink", ["fold", "prune"])
def test_the_block_that_loses_nothing_shrinks_first(shrink):
    """Block 0's second half copies its first: folding it to half is exact, so the allocation
    takes the whole budget there and leaves block 1 alone (pruning, which cannot merge copies,
    finds no such free lunch and must shrink both)."""
    model = tiny_model("llama")
    duplicate_units(model.model.layers[0], mlp_site(model.model.layers[0]))
    n = widths(model)[0]
    if shrink == "fold":
        fold(model, ratio=0.75, layers="global", show_progress=False)
        assert widths(model) == [n // 2, n]
    else:
        prune(model, tiny_data(8), ratio=0.75, layers="global", show_progress=False)
        assert sum(widths(model)) == round(1.5 * n) and min(widths(model)) < n


def test_global_fold_meets_the_size_and_reloads(tmp_path):
    model = fold(tiny_model("llama"), ratio=0.6, heads_ratio=0.5, layers="global", show_progress=False)
    n = tiny_model("llama").config.intermediate_size
    assert abs(sum(widths(model)) - 0.6 * 2 * n) <= 1
    assert model.config.hf_compress["shapes"]  # per-block widths: the self-contained format
    save_checkpoint(model, None, tmp_path / "g")
    data = tiny_data(2)
    ours, _ = load_model(tmp_path / "g")
    torch.testing.assert_close(ours(data).logits, model(data).logits, rtol=0, atol=0)


def test_random_windows_open_with_bos_inside_the_vocabulary():
    model = tiny_model("llama")
    model.config.bos_token_id = 1
    windows = random_windows(model, windows=3, length=5)
    assert windows.shape == (3, 5) and (windows[:, 0] == 1).all()
    assert windows.max() < model.get_input_embeddings().num_embeddings
    model.config.bos_token_id = 10**6  # out of the vocabulary: left random
    assert random_windows(model).max() < model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gemma3", "opt", "falcon"])
def test_global_fold_across_block_layouts(arch, tmp_path):
    """The probe calls each decoder block with the arguments its model gave it, whatever they are:
    separate and fused projections, Conv1D, a composite model's text blocks, an MLP in the block."""
    model = build(arch)
    inputs = tiny_data(2)
    fold(model, ratio=0.7, layers="global", show_progress=False)
    assert 0 < model.config.hf_compress["size_ratio"] < 0.95
    save_checkpoint(model, None, tmp_path / "g")
    reloaded, _ = load_model(tmp_path / "g")
    torch.testing.assert_close(reloaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
