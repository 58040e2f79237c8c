"""Every pruning objective of the pass: reaches the stop ratio within the budget (the controller
drives its strength), ranks every value, resumes, runs from the CLI; the paper's schedule."""

import pytest
import torch

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import AcipConfig, HfCompressError, acip
from hf_compress.acip import objectives, train
from hf_compress.acip.config import OBJECTIVES

SETTINGS = dict(max_steps=16, stop_ratio=0.4, batch_size=4, show_progress=False)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_reaches_stop_ratio_and_ranks_every_value(objective):
    result = acip(tiny_model(), tiny_data(), objective=objective, **SETTINGS)
    summary = result.summary
    assert summary["reached_stop_ratio"] and summary["final_ratio"] <= 0.4, summary["history"][-1]
    for factors in result.layers.values():
        assert (factors.score[:-1] >= factors.score[1:]).all()
    small = result.materialize(0.6)
    assert small(tiny_data(2)).logits.isfinite().all()


@pytest.mark.parametrize("objective", ["drr", "nuclear"])
def test_continuous_objectives_scale_the_values_by_their_masks(objective):
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer = layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, 64)
    before = layer(x)
    objectives.OBJECTIVES[objective](AcipConfig(objective=objective), layers)
    with torch.no_grad():
        layer.mask.mul_(0.5)
    torch.testing.assert_close(layer(x), 0.5 * (before - layer.bias if layer.bias is not None else before))


def test_straight_through_gate_ignores_the_mask_value():
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer, x = layers["model.layers.0.mlp.up_proj"], torch.randn(3, 64)
    objectives.Acip(AcipConfig(objective="acip"), layers)
    before = layer(x)
    with torch.no_grad():
        layer.mask.mul_(0.5)
    torch.testing.assert_close(layer(x), before)


def test_torque_pushes_harder_down_the_spectrum():
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer = layers["model.layers.0.mlp.up_proj"]
    objective = objectives.Torque(AcipConfig(objective="torque"), layers)
    mask = layer.mask.detach().requires_grad_()
    layer.mask = torch.nn.Parameter(mask)
    (grad,) = torch.autograd.grad(objective.penalty(layer), layer.mask)
    n = len(grad)
    assert (grad[1:] > grad[:-1]).all()
    torch.testing.assert_close(grad[-1] / grad[0], torch.tensor(1.01 ** (500 / n * (n - 1))))


def test_paper_schedule_grows_lambda_every_k_steps():
    result = acip(tiny_model(), tiny_data(), objective="acip", lambda_schedule="geometric", lambda_init=1e-3,
                  lambda_growth=1.01, lambda_every=4, mask_init=0.02, mask_lr=5e-5,
                  **{**SETTINGS, "max_steps": 9})
    lambdas = [row["lambda"] for row in result.summary["history"]]
    assert lambdas[:4] == [1e-3] * 4 and lambdas[4] == pytest.approx(1.01e-3) and lambdas[8] == pytest.approx(1.0201e-3)


def test_penalized_pass_resumes_with_its_optimizer(tmp_path, monkeypatch):
    settings = dict(SETTINGS, objective="torque", save_every=3)
    uninterrupted = acip(tiny_model(), tiny_data(), **settings)
    real_step, calls = objectives.Penalized.step, []

    def crash_on_step_eight(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        real_step(*args)

    monkeypatch.setattr(objectives.Penalized, "step", crash_on_step_eight)
    with pytest.raises(KeyboardInterrupt):
        acip(tiny_model(), tiny_data(), progress_dir=tmp_path, **settings)
    saved = torch.load(tmp_path / train.PROGRESS_FILE, weights_only=False)
    assert saved["state"]["step"] == 6 and saved["objective"]["optimizer"]["state"]
    monkeypatch.setattr(objectives.Penalized, "step", real_step)
    resumed = acip(tiny_model(), tiny_data(), progress_dir=tmp_path, **settings)
    assert resumed.summary["steps"] == uninterrupted.summary["steps"]
    for name, factors in uninterrupted.layers.items():
        torch.testing.assert_close(resumed.layers[name].score, factors.score)


def test_unknown_objective_is_one_sentence(monkeypatch, capsys, tmp_path):
    with pytest.raises(HfCompressError, match="objective must be one of"):
        AcipConfig(objective="magic")
    code, _, err = run_cli(monkeypatch, capsys, "compress", "demo", "--objective", "magic", "--output", tmp_path / "c")
    assert code == 1 and "objective must be one of" in err and not (tmp_path / "c").exists()


def test_objective_from_the_cli_is_recorded(monkeypatch, capsys, tmp_path, tokenizer):
    source = tmp_path / "tiny"
    tiny_model().save_pretrained(source)
    tokenizer.save_pretrained(source)
    code, _, err = run_cli(monkeypatch, capsys, "compress", source, "--output", tmp_path / "c", "--objective", "acip",
                           "--max-steps", 4, "--seq-len", 32, "--batch-size", 4)
    assert code in (0, None), err
    from hf_compress import CompressibleModel

    assert CompressibleModel.from_pretrained(tmp_path / "c").config.objective == "acip"


@pytest.mark.parametrize("objective", ["drr", "nuclear"])
def test_continuous_masks_are_folded_into_the_stored_values(objective):
    """What the model saw in the pass is what materialize builds: s x mask for alive values."""
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer = layers["model.layers.0.mlp.up_proj"]
    objectives.OBJECTIVES[objective](AcipConfig(objective=objective), layers)
    with torch.no_grad():
        layer.mask.copy_(torch.linspace(1.5, 0.1, len(layer.mask)))
    values = torch.arange(len(layer.s))
    u, s, vt = layer.factors(values)
    x = torch.randn(3, 64)
    torch.testing.assert_close(x @ vt.t() * s @ u.t() + (0 if layer.bias is None else layer.bias), layer(x))
