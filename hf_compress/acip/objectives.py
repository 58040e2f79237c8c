"""What moves the masks of the pass: one class per pruning objective.

The pass is one loop for all of them (SVD form, gates, score map by order of death, size
controller, resume, Accelerate). Each step the loop runs forward and backward on calibration
text, so every alive mask holds its task-loss gradient, and then calls `Objective.step(layers,
lam)`: the objective moves the masks, with `lam` the strength the loop steers so the model
shrinks on schedule. A value dies when its mask reaches 0; alive values score
`Objective.importance`, dead ones by order of death, and that score map is the ranking.

Two kinds of gate: straight-through (the model sees 1 while the mask is positive and the mask
gets the gradient of that 1) for `saliency`, `acip`, `torque`; continuous (the model sees the
mask itself, multiplying its singular value) for `drr` and `nuclear`.

Units of `lam`: under the controller (the default) every penalty is rescaled once, at the first
step, so that its mean gradient per alive mask equals the mean |task gradient| per alive mask:
`lam` = 1 means "as strong as the data". Under `lambda_schedule="geometric"` (the paper's) `lam`
multiplies the penalty as written.
"""

from __future__ import annotations

import torch

from .config import OBJECTIVES as NAMES, AcipConfig
from .layer import SVDLinear


class Objective:
    """One pruning objective; subclasses set `name`, `continuous` and implement `step`."""

    name: str
    continuous = False  # the model sees the mask itself rather than a straight-through 1

    def __init__(self, config: AcipConfig, layers: dict[str, SVDLinear]):
        self.config = config
        for layer in layers.values():
            layer.continuous = self.continuous

    def step(self, layers: dict[str, SVDLinear], lam: float) -> None:
        raise NotImplementedError

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        """What an alive value scores (higher: kept longer)."""
        return layer.mask

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def with_gradient(layers: dict[str, SVDLinear]) -> list[SVDLinear]:
    """Layers whose masks got a task gradient this step (an expert no token reached has none and
    is left as it is)."""
    return [layer for layer in layers.values() if layer.mask.grad is not None]


class Saliency(Objective):
    """mask += lr * (|dL/dgate| / mean over alive masks - lam), capped at the initial mask.

    An accumulated first-order saliency with a drain: a value whose removal the loss feels
    (large |gate gradient|) is refilled faster than lam drains it; summed over steps this is a
    de-noised importance, re-measured as the model shrinks. hf-compress's own rule (the default),
    after ACIP's (Genzel et al., 2025) straight-through masks: near a pretrained minimum the
    sign of a per-batch gate gradient is mostly noise, so the rule uses its magnitude.
    """

    name = "saliency"

    @torch.no_grad()
    def step(self, layers: dict[str, SVDLinear], lam: float) -> None:
        reached = with_gradient(layers)
        if not reached:
            return
        grads = torch.cat([layer.mask.grad[layer.alive] for layer in reached])
        scale = grads.float().abs().mean().clamp_min(1e-20)
        for layer in reached:
            layer.mask += self.config.learning_rate * (layer.mask.grad.abs() / scale - lam * layer.alive)
            layer.mask.clamp_(max=self.config.mask_init)
            layer.mask.grad = None


FRACTION = 0.25


class Penalized(Objective):
    """Masks trained by AdamW on the task loss plus lam x a penalty on the masks (`penalty`)."""

    def __init__(self, config: AcipConfig, layers: dict[str, SVDLinear]):
        super().__init__(config, layers)
        self.masks = [layer.mask for layer in layers.values()]
        self.optimizer = torch.optim.AdamW(self.masks, lr=self.learning_rate(config), betas=self.betas(config),
                                           weight_decay=0.0)
        self.scale = None if config.lambda_schedule == "controller" else 1.0

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        """This layer's penalty on its alive masks (differentiable)."""
        raise NotImplementedError

    @staticmethod
    def betas(config: AcipConfig) -> tuple[float, float]:
        """Adam's momentum remembers about 1 / (1 - beta1) steps: at most a twentieth of the budget
        (the paper's 0.9 from 200 steps on), or the controller's corrections arrive too late."""
        return max(0.0, min(0.9, 1 - 1 / max(1.0, 0.05 * config.max_steps))), 0.999

    @staticmethod
    def learning_rate(config: AcipConfig) -> float:
        """Adam moves every mask by about lr a step whatever its gradient's size, so by default a
        mask needs a quarter of the budget to die: the controller has time to react."""
        return config.mask_lr if config.mask_lr is not None else config.mask_init / max(1.0, FRACTION * config.max_steps)

    def step(self, layers: dict[str, SVDLinear], lam: float) -> None:
        reached = with_gradient(layers)
        if not reached:
            return
        with torch.enable_grad():
            penalty = sum(self.penalty(layer) for layer in reached)
            grads = torch.autograd.grad(penalty, [layer.mask for layer in reached])
        if self.scale is None:  # once: lam = 1 pulls as hard as the data pushes, on average
            alive = [layer.alive for layer in reached]
            task = torch.cat([layer.mask.grad[a] for layer, a in zip(reached, alive)]).abs().mean()
            pull = torch.cat([g[a] for g, a in zip(grads, alive)]).abs().mean()
            self.scale = float(task / pull.clamp_min(1e-20))
        with torch.no_grad():
            for layer, grad in zip(reached, grads):
                layer.mask.grad += lam * self.scale * grad
        self.optimizer.step()  # masks without a gradient are skipped
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale = state["scale"]


class Acip(Penalized):
    """ACIP (Genzel et al., 2025, arXiv 2502.01717): task loss + lam * sum ||relu(mask)||_1 over
    straight-through masks, trained by AdamW. The paper's setting: `mask_init=0.02,
    mask_lr=5e-5, lambda_schedule="geometric", lambda_init=1e-3, lambda_growth=1.01,
    lambda_every=4, lora_rank=32, lora_alpha=16, stop_ratio=0.4`."""

    name = "acip"

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        return torch.relu(layer.mask[layer.alive]).sum()


class Torque(Penalized):
    """Exponential torque pruning (arXiv 2506.22015): a force that grows exponentially with the
    distance from a pivot. Per layer with n singular values in keep order (pivot: the largest),
    R = (1/n) sum_i alpha^i |mask_i| with alpha = 1.01^(500/n), as in the reference code, so
    the values down the spectrum are pushed to zero far harder than the leading ones."""

    name = "torque"

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        n = len(layer.mask)
        alpha = 1.01 ** (500 / n)
        weights = alpha ** torch.arange(n, device=layer.mask.device, dtype=torch.float32)
        return (weights * layer.mask.abs() * layer.alive).sum() / n


class Drr(Penalized):
    """DRR (Barth & von Petersenn, arXiv 2505.17469): a smooth l0 surrogate,
    lam * sum (1 - exp(-beta |mask|)), on continuous masks that multiply their singular values:
    small masks are pulled to zero hard, large ones hardly at all."""

    name = "drr"
    continuous = True

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        return (1 - torch.exp(-self.config.drr_beta * layer.mask[layer.alive].abs())).sum()

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        return layer.mask.abs()


class Nuclear(Penalized):
    """Smooth nuclear-norm compression (arXiv 2505.24469): the singular values themselves train
    (each is s_i * mask_i, the mask continuous, starting at 1) under lam * their L1 norm, i.e. the
    nuclear norm in the fixed orthonormal basis, plus optionally `nuclear_smoothness` x the
    squared first differences of the trained spectrum (normalized by the largest value). Values
    rank by their trained magnitude s_i * mask_i."""

    name = "nuclear"
    continuous = True

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        values = layer.s * layer.mask
        penalty = values[layer.alive].abs().sum()
        if self.config.nuclear_smoothness:
            spectrum = values / layer.s[0].clamp_min(1e-20)
            penalty = penalty + self.config.nuclear_smoothness * spectrum.diff().pow(2).sum()
        return penalty

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        return (layer.s * layer.mask).abs()


OBJECTIVES = {cls.name: cls for cls in (Saliency, Acip, Torque, Drr, Nuclear)}
assert tuple(OBJECTIVES) == NAMES  # the names the config accepts


def make_objective(config: AcipConfig, layers: dict[str, SVDLinear]) -> Objective:
    return OBJECTIVES[config.objective](config, layers)
