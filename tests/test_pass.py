"""The ACIP pass: schedule, score map, determinism, LoRA, stopping, resuming, bad input."""

import os

import pytest
import torch

from conftest import tiny_data, tiny_model
from hf_compress import AcipConfig, HfCompressError, acip
from hf_compress.acip import train
from hf_compress.acip.objectives import Saliency


def short_pass(**kwargs):
    settings = dict(max_steps=12, stop_ratio=0.4, batch_size=4, show_progress=False)
    settings.update(kwargs)
    return acip(tiny_model(settings.pop("arch", "llama")), tiny_data(), **settings)


def test_reaches_stop_ratio_within_budget_and_ranks_every_value():
    result = short_pass()
    summary = result.summary
    assert summary["reached_stop_ratio"] and summary["final_ratio"] <= 0.4
    assert summary["steps"] <= 12 and len(summary["history"]) == summary["steps"]
    for factors in result.layers.values():
        scores = factors.score
        assert (scores[:-1] >= scores[1:]).all()  # stored best first
        dead = scores <= 0
        since = -scores[dead].ceil()  # dead: -(steps since death), minus a fraction for how deep
        assert (since >= 0).all() and (since < summary["steps"]).all()


def test_same_seed_same_scores():
    a, b = short_pass(), short_pass()
    for name in a.layers:
        assert torch.equal(a.layers[name].score, b.layers[name].score)


def test_gradient_checkpointing_changes_memory_not_scores():
    checkpointed, plain = short_pass(), short_pass(gradient_checkpointing=False)
    for name, factors in plain.layers.items():
        torch.testing.assert_close(checkpointed.layers[name].score, factors.score)
    model = checkpointed.base_model
    assert not any("forward" in vars(block) for block in model.model.layers)  # the patch is undone


def test_masks_without_gradient_stay_put():
    """A layer no token reached (an unrouted expert) gets no gradient; the others still move."""
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj",
                                                             "model.layers.1.mlp.up_proj"])
    first, second = layers.values()
    first.mask.grad = torch.ones_like(first.mask)
    Saliency(AcipConfig(mask_lr=0.1, mask_init=2.0), layers).step(layers, lam=0.5)
    assert (first.mask == 1.05).all() and (second.mask == 1.0).all()


def test_model_is_restored_to_dense():
    model, data = tiny_model(), tiny_data()
    reference = model(data[:2]).logits
    result = acip(model, data, max_steps=4, batch_size=4, show_progress=False)
    assert result.base_model is model
    torch.testing.assert_close(model(data[:2]).logits, reference)


def test_budget_too_small_warns_and_still_ranks():
    with pytest.warns(UserWarning, match="without reaching"):
        result = short_pass(max_steps=2, stop_ratio=0.1, lora_rank=0)  # adapters would cost a fifth of 0.2
    assert not result.summary["reached_stop_ratio"]
    for factors in result.layers.values():  # every value still has its place in the order
        assert (factors.score[:-1] >= factors.score[1:]).all()
    small = result.materialize(0.2, structure="svd", compensate=False)  # below where the pass stopped
    assert small.config.hf_compress["size_ratio"] <= 0.2 < result.summary["final_ratio"]


def test_lora_is_trained_and_kept():
    result = short_pass(lora_rank=3)
    factors = result.layers["model.layers.0.mlp.up_proj"]
    assert factors.lora_a.shape == (3, 64) and factors.lora_b.shape == (96, 3)
    assert factors.lora_b.abs().sum() > 0


def test_adapters_learn_slower_in_a_longer_pass_unless_told():
    assert AcipConfig(max_steps=20).adapter_learning_rate == AcipConfig(max_steps=60).adapter_learning_rate == 1e-3
    assert AcipConfig(max_steps=240).adapter_learning_rate == pytest.approx(5e-4)
    assert AcipConfig(max_steps=240, lora_lr=2e-3).adapter_learning_rate == 2e-3


def test_too_little_data_is_an_error():
    with pytest.raises(HfCompressError, match="too little calibration data"):
        acip(tiny_model(), tiny_data(n=3), batch_size=4, show_progress=False)


@pytest.mark.parametrize("kwargs", [dict(stop_ratio=1.2), dict(stop_ratio=0), dict(basis="qr"),
                                    dict(max_steps=0), dict(lora_rank=-1)])
def test_bad_settings_are_errors(kwargs):
    with pytest.raises(HfCompressError):
        AcipConfig(**kwargs)


def test_interrupted_pass_resumes_where_it_stopped(tmp_path, monkeypatch):
    settings = dict(max_steps=10, stop_ratio=0.2, batch_size=4, save_every=3, lora_rank=2, show_progress=False)
    uninterrupted = acip(tiny_model(), tiny_data(), **settings)

    real_step, calls = Saliency.step, []

    def crash_on_step_eight(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        real_step(*args)

    monkeypatch.setattr(Saliency, "step", crash_on_step_eight)
    with pytest.raises(KeyboardInterrupt):
        acip(tiny_model(), tiny_data(), progress_dir=tmp_path, **settings)
    assert torch.load(tmp_path / train.PROGRESS_FILE, weights_only=True)["state"]["step"] == 6
    monkeypatch.setattr(Saliency, "step", real_step)
    resumed = acip(tiny_model(), tiny_data(), progress_dir=tmp_path, **settings)
    assert resumed.summary["steps"] == uninterrupted.summary["steps"]
    for name, factors in uninterrupted.layers.items():
        torch.testing.assert_close(resumed.layers[name].score, factors.score)


class RunsCode:
    """What a tampered progress file could hold: unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["code", "garbage"])
def test_a_progress_file_is_read_as_data_only(tmp_path, content):
    path = tmp_path / train.PROGRESS_FILE
    if content == "code":
        torch.save({"config": {}, "state": RunsCode(tmp_path / "ran")}, path)
    else:
        path.write_bytes(b"not a torch file")
    with pytest.raises(HfCompressError, match="is not a state hf-compress can read .*; pass --overwrite"):
        acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, progress_dir=tmp_path, show_progress=False)
    assert not (tmp_path / "ran").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, save_every=2, progress_dir=tmp_path,
         show_progress=False)
    with pytest.raises(HfCompressError, match="other settings"):
        acip(tiny_model(), tiny_data(), max_steps=5, batch_size=4, progress_dir=tmp_path,
             show_progress=False)
