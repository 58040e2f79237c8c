"""What moves the masks of the pass: one class per pruning objective.

The pass is one loop for all of them (SVD form, gates, score map by order of death, size
controller, resume, Accelerate). Each step the loop runs forward and backward on calibration
text, so every alive mask holds its task-loss gradient, and then calls `Objective.step(layers,
lam)`: the objective moves the masks, with `lam` the strength the loop steers so the model
shrinks on schedule. A value dies when its mask reaches 0; alive values score
`Objective.importance`, dead ones by order of death, and that score map is the ranking.

Two kinds of gate: straight-through (the model sees 1 while the mask is positive and the mask
gets the gradient of that 1) for `saliency`, `acip`, `torque`; continuous (the model sees the
mask itself, multiplying its singular value) for `drr`, `nuclear` and `pmmp`. Either way the
pass only ranks: every size is materialized from the original singular values.

Units of `lam`: under the controller (the default) every penalty is rescaled once, at the first
step, so that its mean gradient per alive mask equals the mean |task gradient| per alive mask:
`lam` = 1 means "as strong as the data". Under `lambda_schedule="geometric"` (the paper's) `lam`
multiplies the penalty as written.
"""

from __future__ import annotations

import torch

from .config import OBJECTIVES as NAMES, AcipConfig
from .layer import Ranked, SVDLinear


CONTINUOUS_DEATH = 0.05


class Objective:
    """One pruning objective; subclasses set `name`, `continuous` and implement `step`."""

    name: str
    continuous = False  # the model sees the mask itself rather than a straight-through 1

    def __init__(self, config: AcipConfig, layers: dict[str, Ranked]):
        self.config = config
        for layer in layers.values():
            layer.continuous = self.continuous
        units = sum(len(layer.mask) for layer in layers.values())
        self.mean_cost = sum(layer.cost * len(layer.mask) for layer in layers.values()) / max(1, units)

    def step(self, layers: dict[str, SVDLinear], lam: float) -> None:
        raise NotImplementedError

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        """What an alive value scores (higher: kept longer)."""
        return layer.mask

    @property
    def death(self) -> float:
        """The mask, as a fraction of its start, at which a value dies. A straight-through value
        dies at 0; a continuous one below CONTINUOUS_DEATH, where removing it changes the layer by
        no more than that fraction of the value (it would otherwise hover near 0 for long)."""
        return CONTINUOUS_DEATH if self.continuous else 0.0

    def fullness(self, layer: SVDLinear) -> torch.Tensor:
        """How far each value is from dying, 1 at the start and 0 at death: the soft size the
        controller steers by counts values by it."""
        return self.distance(layer).clamp(min=0)

    def depth(self, layer: SVDLinear) -> torch.Tensor:
        """How far past death each value went (0 for the living): values that die in the same
        step rank by it, the deepest first to go."""
        return (-self.distance(layer)).clamp(min=0)

    def distance(self, layer: SVDLinear) -> torch.Tensor:
        """Fullness before clamping: negative past death."""
        return (layer.mask / self.config.mask_init - self.death) / (1 - self.death)

    def dying(self, layer: SVDLinear) -> torch.Tensor:
        """Which values die now."""
        return layer.mask <= self.death * self.config.mask_init

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def with_gradient(layers: dict[str, SVDLinear]) -> list[SVDLinear]:
    """Layers whose masks got a task gradient this step (an expert no token reached has none and
    is left as it is)."""
    return [layer for layer in layers.values() if layer.mask.grad is not None]


class Saliency(Objective):
    """mask += lr * (a / mean a over alive masks - lam), capped at the initial mask, where
    a = |dL/dgate| / (cost / mean cost): a unit's first-order loss change per parameter it holds,
    so singular values, channels and head groups die in the order of what they cost per parameter
    saved, each at the same pace whatever its size.

    An accumulated first-order saliency with a drain: a value whose removal the loss feels
    (large |gate gradient|) is refilled faster than lam drains it; summed over steps this is a
    de-noised importance, re-measured as the model shrinks. hf-compress's own rule (the default),
    after ACIP's (Genzel et al., 2025) straight-through masks: near a pretrained minimum the
    sign of a per-batch gate gradient is mostly noise, so the rule uses its magnitude.
    """

    name = "saliency"

    @torch.no_grad()
    def step(self, layers: dict[str, Ranked], lam: float) -> None:
        reached = with_gradient(layers)
        if not reached:
            return
        saliency = {id(layer): layer.mask.grad.abs().float() * (self.mean_cost / layer.cost) for layer in reached}
        scale = torch.cat([saliency[id(layer)][layer.alive] for layer in reached]).mean().clamp_min(1e-20)
        for layer in reached:
            layer.mask += self.config.learning_rate * (saliency[id(layer)] / scale - lam * layer.alive)
            layer.mask.clamp_(max=self.config.mask_init)
            layer.mask.grad = None


FRACTION = 0.25
CLIP = 3.0  # continuous masks: a step moves a mask by at most 3 x lr (it can die in a third of the budget)


class Penalized(Objective):
    """Masks (and whatever else `trained` names) trained on the task loss plus lam x `penalty`.

    Straight-through masks train by AdamW: its steps are about lr whatever the gradient's size,
    which costs nothing while the model sees 1. A continuous mask is what the model sees, so it
    moves by plain gradient descent on gradients normalized by this step's mean |task gradient|
    (as `saliency` does), slowly (a whole budget per mask_init at the mean gradient), each
    normalized gradient clipped to +-CLIP: near a pretrained
    minimum a batch's gradient is mostly noise with heavy tails, and larger steps are a random
    walk that wrecks the model long before anything dies.
    """

    def __init__(self, config: AcipConfig, layers: dict[str, SVDLinear]):
        super().__init__(config, layers)
        trained = [t for layer in layers.values() for t in self.trained(layer)]
        if self.continuous:
            self.optimizer = torch.optim.SGD(trained, lr=self.learning_rate(config))
        else:
            self.optimizer = torch.optim.AdamW(trained, lr=self.learning_rate(config), betas=self.betas(config),
                                               weight_decay=0.0)
        self.scale = None if config.lambda_schedule == "controller" else 1.0

    def trained(self, layer: SVDLinear) -> list[torch.Tensor]:
        return [layer.mask]

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        """This layer's penalty on its alive masks (differentiable)."""
        raise NotImplementedError

    def loss(self, reached: list[SVDLinear], lam: float) -> torch.Tensor:
        """What the objective adds to the task loss, in the controller's units."""
        return lam * self.scale * sum(self.penalty(layer) for layer in reached)

    def pull(self, reached: list[SVDLinear]) -> torch.Tensor:
        """Mean |gradient| of the penalty per alive mask, at lam = 1 unscaled."""
        grads = torch.autograd.grad(sum(self.penalty(layer) for layer in reached), [l.mask for l in reached])
        return torch.cat([g[layer.alive] for g, layer in zip(grads, reached)]).abs().mean()

    def precondition(self, layer: SVDLinear) -> torch.Tensor | float:
        """Continuous masks: what their gradients are multiplied by before normalization."""
        return 1.0

    def after_step(self, reached: list[SVDLinear]) -> None:
        """Called after the optimizer's step, to keep what it moved in range."""

    @staticmethod
    def betas(config: AcipConfig) -> tuple[float, float]:
        """Adam's momentum remembers about 1 / (1 - beta1) steps: at most a twentieth of the budget
        (the paper's 0.9 from 200 steps on), or the controller's corrections arrive too late."""
        return max(0.0, min(0.9, 1 - 1 / max(1.0, 0.05 * config.max_steps))), 0.999

    def learning_rate(self, config: AcipConfig) -> float:
        """Adam moves every mask by about lr a step whatever its gradient's size, so by default a
        mask needs a quarter of the budget to die: the controller has time to react. Continuous
        masks: a whole budget per mask_init at the mean gradient (see the class docstring)."""
        if config.mask_lr is not None:
            return config.mask_lr
        return config.mask_init / max(1.0, (1.0 if self.continuous else FRACTION) * config.max_steps)

    def step(self, layers: dict[str, SVDLinear], lam: float) -> None:
        reached = with_gradient(layers)
        if not reached:
            return
        task = torch.cat([layer.mask.grad[layer.alive] for layer in reached]).abs().mean().clamp_min(1e-20)
        with torch.enable_grad():
            if self.scale is None:  # once: lam = 1 pulls as hard as the data pushes, on average
                self.scale = float(task / self.pull(reached).clamp_min(1e-20))
            trained = [t for layer in reached for t in self.trained(layer)]
            grads = torch.autograd.grad(self.loss(reached, lam), trained, allow_unused=True)
        with torch.no_grad():
            conditioned = {id(layer.mask): self.precondition(layer) for layer in reached} if self.continuous else {}
            for tensor, grad in zip(trained, grads):
                grad = torch.zeros_like(tensor) if grad is None else grad
                tensor.grad = grad if tensor.grad is None else tensor.grad + grad
                if self.continuous:
                    tensor.grad = (tensor.grad * conditioned.get(id(tensor), 1.0) / task).clamp(-CLIP, CLIP)
            self.optimizer.step()  # masks without a gradient are skipped
            self.after_step(reached)
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
    squared first differences of the trained spectrum (normalized by the largest value). The
    descent is on the values themselves (a mask's gradient is multiplied by (mean s / s_i)^2,
    the layer's mean singular value keeping the step's unit), so like the
    nuclear norm's proximal step it takes about the same amount off every value and small values
    die first, instead of every value shrinking by the same fraction. Values rank by their
    trained magnitude s_i * mask_i."""

    name = "nuclear"
    continuous = True

    def penalty(self, layer: SVDLinear) -> torch.Tensor:
        values = layer.s * layer.mask
        penalty = values[layer.alive].abs().sum()
        if self.config.nuclear_smoothness:
            spectrum = values / layer.s[0].clamp_min(1e-20)
            penalty = penalty + self.config.nuclear_smoothness * spectrum.diff().pow(2).sum()
        return penalty

    def precondition(self, layer: SVDLinear) -> torch.Tensor:
        return (layer.s.mean() / layer.s.clamp_min(1e-6 * float(layer.s.max()))) ** 2

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        return (layer.s * layer.mask).abs()


class Pmmp(Penalized):
    """PMMP, probabilistic minimax pruning (Barth & von Petersenn, arXiv 2505.17469), without
    Monte-Carlo sampling. Each value has a keep probability p in [0, 1] and a latent magnitude w
    beside its continuous gate a (what the model uses); per layer a multiplier u >= 0 enforces
    that a behaves like w z with z ~ Bernoulli(p) (u starts at 1, in units of the data's pull):
        min over (a, w, p), max over u of  L + lam sum p + u sum[(a - w p)^2 + w^2 p (1 - p)].
    The bracket is E[(a - w z)^2]: it pulls a towards w p and p towards 0 or 1. u rises by the
    layer's mean violation each step (gradient ascent); values rank by p and die at p = 0."""

    name = "pmmp"
    continuous = True

    def __init__(self, config: AcipConfig, layers: dict[str, SVDLinear]):
        self.keep = {id(l): torch.ones_like(l.mask, requires_grad=True) for l in layers.values()}
        self.latent = {id(l): torch.full_like(l.mask, config.mask_init, requires_grad=True) for l in layers.values()}
        self.multiplier = {id(l): torch.ones((), device=l.mask.device) for l in layers.values()}
        self.names = {id(layer): name for name, layer in layers.items()}
        super().__init__(config, layers)

    def trained(self, layer: SVDLinear) -> list[torch.Tensor]:
        return [layer.mask, self.keep[id(layer)], self.latent[id(layer)]]

    def violation(self, layer: SVDLinear) -> torch.Tensor:
        a, p, w = layer.mask, self.keep[id(layer)], self.latent[id(layer)]
        return ((a - w * p) ** 2 + w**2 * p * (1 - p))[layer.alive] / self.config.mask_init**2

    def loss(self, reached: list[SVDLinear], lam: float) -> torch.Tensor:
        return self.scale * sum(lam * self.keep[id(l)][l.alive].sum() + self.multiplier[id(l)] * self.violation(l).sum()
                                for l in reached)

    def pull(self, reached: list[SVDLinear]) -> torch.Tensor:
        return torch.tensor(1.0)  # d(sum p)/dp: lam pulls each keep probability by lam

    def after_step(self, reached: list[SVDLinear]) -> None:
        super().after_step(reached)
        for layer in reached:
            self.keep[id(layer)].clamp_(0, 1)
            self.latent[id(layer)].clamp_(min=0)
            self.multiplier[id(layer)] += self.violation(layer).mean()

    def importance(self, layer: SVDLinear) -> torch.Tensor:
        return self.keep[id(layer)].detach().clone()

    def distance(self, layer: SVDLinear) -> torch.Tensor:
        return self.keep[id(layer)].detach()  # clamped at 0: values dying together tie

    def dying(self, layer: SVDLinear) -> torch.Tensor:
        return self.keep[id(layer)].detach() <= 0

    def state_dict(self) -> dict:
        tensors = {self.names[key]: {"keep": self.keep[key].detach().cpu(), "latent": self.latent[key].detach().cpu(),
                                     "multiplier": self.multiplier[key].cpu()} for key in self.keep}
        return {**super().state_dict(), "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key, name in self.names.items():
            saved = state["tensors"][name]
            self.keep[key].copy_(saved["keep"])
            self.latent[key].copy_(saved["latent"])
            self.multiplier[key].copy_(saved["multiplier"])


OBJECTIVES = {cls.name: cls for cls in (Saliency, Acip, Torque, Drr, Nuclear, Pmmp)}
assert tuple(OBJECTIVES) == NAMES  # the names the config accepts


def make_objective(config: AcipConfig, layers: dict[str, SVDLinear]) -> Objective:
    return OBJECTIVES[config.objective](config, layers)
