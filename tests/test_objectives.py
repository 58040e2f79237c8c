"""Every pruning objective of the pass: reaches the stop ratio within the budget (the controller
drives its strength), ranks every value, resumes, runs from the CLI; the paper's schedule."""

import pytest
import torch

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import AcipConfig, HfCompressError, acip
from hf_compress.acip import objectives, train
from hf_compress.acip.config import OBJECTIVES

SETTINGS = dict(max_steps=20, stop_ratio=0.4, batch_size=4, show_progress=False)


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


@pytest.mark.parametrize("objective", ["torque", "pmmp"])
def test_penalized_pass_resumes_with_its_optimizer(tmp_path, monkeypatch, objective):
    settings = dict(SETTINGS, objective=objective, save_every=3)
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
    assert saved["state"]["step"] == 6
    if objective == "torque":  # Adam's moments travel
        assert saved["objective"]["optimizer"]["state"]
    else:  # keep probabilities, latent magnitudes and multipliers travel (plain SGD has no state)
        assert all((t["keep"] < 1).any() and t["multiplier"] > 0 for t in saved["objective"]["tensors"].values())
    monkeypatch.setattr(objectives.Penalized, "step", real_step)
    resumed = acip(tiny_model(), tiny_data(), progress_dir=tmp_path, **settings)
    assert resumed.summary["steps"] == uninterrupted.summary["steps"]
    for name, factors in uninterrupted.layers.items():
        torch.testing.assert_close(resumed.layers[name].score, factors.score)


def test_unknown_objective_is_one_sentence(tmp_path):
    with pytest.raises(HfCompressError, match="objective must be one of"):
        AcipConfig(objective="magic")
    code, _, err = run_cli("compress", "demo", "--objective", "magic", "--output", tmp_path / "c")
    assert code == 1 and "objective must be one of" in err and not (tmp_path / "c").exists()


def test_objective_from_the_cli_is_recorded(tmp_path, tokenizer):
    source = tmp_path / "tiny"
    tiny_model().save_pretrained(source)
    tokenizer.save_pretrained(source)
    code, _, err = run_cli("compress", source, "--output", tmp_path / "c", "--objective", "acip",
                           "--max-steps", 4, "--seq-len", 32, "--batch-size", 4)
    assert code in (0, None), err
    from hf_compress import CompressibleModel

    assert CompressibleModel.from_pretrained(tmp_path / "c").config.objective == "acip"


@pytest.mark.parametrize("objective", ["drr", "nuclear", "pmmp"])
def test_continuous_masks_rank_values_but_keep_their_singular_values(objective):
    result = acip(tiny_model(), tiny_data(), objective=objective, basis="plain", **SETTINGS)
    model = tiny_model()
    for name, factors in result.layers.items():
        s = torch.linalg.svdvals(model.get_submodule(name).weight.detach().float())
        gaps = (factors.s[:, None] - s[None, :]).abs().min(dim=1).values
        assert gaps.max() < 1e-4 * s.max()  # each stored value is one of the layer's singular values


def test_pmmp_violation_is_the_expected_squared_gap_to_a_bernoulli_value():
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer = layers["model.layers.0.mlp.up_proj"]
    objective = objectives.Pmmp(AcipConfig(objective="pmmp"), layers)
    with torch.no_grad():
        layer.mask.uniform_(0, 1)
        objective.keep[id(layer)].uniform_(0, 1)
        objective.latent[id(layer)].uniform_(0, 2)
    a, p, w = layer.mask.detach(), objective.keep[id(layer)].detach(), objective.latent[id(layer)].detach()
    expected = p * (a - w) ** 2 + (1 - p) * a**2  # E[(a - w z)^2] with z = 1 w.p. p, else 0
    torch.testing.assert_close(objective.violation(layer).detach(), expected)
    assert torch.equal(objective.importance(layer), p) and not objective.dying(layer).any()


def test_nuclear_descends_on_the_values_so_small_values_move_most():
    model = tiny_model()
    layers = train.inject(model, AcipConfig(basis="plain"), ["model.layers.0.mlp.up_proj"])
    layer = layers["model.layers.0.mlp.up_proj"]
    objective = objectives.Nuclear(AcipConfig(objective="nuclear", max_steps=100), layers)
    objective.scale = 1e-3 / float(layer.s.mean())  # the penalty's pull: about the task's at the mean value
    layer.mask.grad = torch.full_like(layer.mask, 1e-3)
    before = layer.mask.detach().clone()
    objective.step(layers, lam=1.0)
    moved = before - layer.mask.detach()  # values sorted largest first
    assert (moved[1:] >= moved[:-1] - 1e-7).all() and moved[-1] > 2 * moved[0] > 0
