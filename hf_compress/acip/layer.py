"""A Linear (or Conv1D) rewritten as y = U diag(gate * s) V^T x + b with a mask per singular value.

The gate is 1 while the value is alive (mask > 0) and passes the mask's gradient straight
through (or, for continuous objectives, is the mask itself); once the mask reaches 0 the value
is dead for good and dropped from the computation,
so steps get cheaper as the pass goes on. An optional LoRA adapter trains alongside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..layers import LayerShape, dense_weight, layer_shape


def svd_factors(weight: torch.Tensor, cholesky: torch.Tensor | None = None):
    """Thin SVD of `weight` (out x in) in fp32, as (U, s, Vt) with U diag(s) Vt == weight.

    With the Cholesky factor L of the input covariance, the SVD is taken of W L and Vt maps back
    through L^-1: the singular values then measure each direction's effect on the layer's output
    over the calibration inputs rather than its weight energy.
    """
    weight = weight.float()
    if cholesky is None:
        return torch.linalg.svd(weight, full_matrices=False)
    u, s, vt = torch.linalg.svd(weight @ cholesky, full_matrices=False)
    vt = torch.linalg.solve_triangular(cholesky, vt, upper=False, left=False)
    return u, s, vt


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP may have sharded (a collective: every process calls it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of a parameter FSDP may have sharded (all of it otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Ranked(nn.Module):
    """What the pass ranks: one mask per unit (a singular value, an MLP channel, a head group),
    which units are alive, and their scores. `cost` is the dense parameters one unit holds: the
    objective drains each unit in proportion to it, so units are ranked by what they save."""

    def __init__(self, mask: torch.Tensor, cost: int):
        super().__init__()
        self.mask = nn.Parameter(mask)
        self.register_buffer("alive", torch.ones_like(mask, dtype=torch.bool))
        self.register_buffer("score", torch.zeros_like(mask))
        self.cost = cost
        self.continuous = False  # set by the objective: the model sees the mask, not a straight-through 1

    def on_death(self) -> None:
        """Called after units died."""

    @torch.no_grad()
    def update_scores(self, importance: torch.Tensor, died: torch.Tensor, depth: torch.Tensor) -> None:
        """After an optimizer step: alive units score their `importance`, those that `died` now
        score 1 / (1 + `depth` past death) in (0, 1], and every dead score then drops by 1, so the
        earlier a unit died the lower it ranks, and of those dying together the deepest first."""
        died = self.alive & died
        self.score.copy_(torch.where(self.alive, importance, self.score))
        self.score[died] = 1 / (1 + depth[died].float())
        self.alive &= ~died
        self.score[~self.alive] -= 1.0
        if died.any():
            self.on_death()


class SVDLinear(Ranked):
    """U and V are frozen parameters (out x r and in x r) so that FSDP shards them by rows: every
    process holds all singular values of its rows, and dropping dead values stays local. They
    store alive values first, so the matmuls use column views, not copies; `stored[p]` is the
    value held in column p. Resumable state is masks, scores and LoRA alone (the factors are
    recomputed deterministically). A layer made with `waiting` is another process's to factorize
    (FSDP): its tensors have their shapes on the meta device until `train.share_factors` fills
    them."""

    def __init__(
        self,
        base: nn.Module,
        cholesky: torch.Tensor | None,
        mask_init: float,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        waiting: bool = False,
    ):
        shape = layer_shape(base)
        weight = dense_weight(base).detach()
        if waiting:
            rank = min(shape.in_features, shape.out_features)
            u, s, vt = (torch.empty(size, device="meta")
                        for size in ((shape.out_features, rank), (rank,), (rank, shape.in_features)))
        else:
            u, s, vt = svd_factors(weight, cholesky)
        super().__init__(torch.full_like(s, mask_init), shape.in_features + shape.out_features)
        self.shape: LayerShape = shape
        self.waiting = waiting
        dtype = weight.dtype
        self.u = nn.Parameter(u.to(dtype).contiguous(), requires_grad=False)
        self.v = nn.Parameter(vt.t().to(dtype).contiguous(), requires_grad=False)
        self.register_buffer("s", s)
        self.register_buffer("stored", torch.arange(len(s), device=s.device))
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(s.device), requires_grad=False)
        self.lora_scale = (lora_alpha or lora_rank) / lora_rank if lora_rank else 0.0
        if lora_rank:
            lora_a = torch.empty(lora_rank, self.shape.in_features, dtype=dtype, device=weight.device)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # in every process: the random stream stays in step
            self.lora_a = nn.Parameter(lora_a.to(s.device))
            self.lora_b = nn.Parameter(torch.zeros(self.shape.out_features, lora_rank, dtype=dtype, device=s.device))
        else:
            self.lora_a = self.lora_b = None
        if not waiting:
            self.compact()

    @property
    def rank(self) -> int:
        return int(self.alive.sum())

    @torch.no_grad()
    def compact(self) -> None:
        """Drop dead singular values from the computation (after `alive` shrank): move the alive
        ones, in value order, to the front of the stored columns (one layer's copy at a time)."""
        self._index = self.alive.nonzero().squeeze(1)
        n = len(self._index)
        if not torch.equal(self.stored[:n], self._index):
            order = torch.cat([self._index, (~self.alive).nonzero().squeeze(1)])
            take = self._positions(order)
            for factor in (local(self.u), local(self.v)):
                factor.copy_(factor[:, take])
            self.stored.copy_(order)
        self._s = self.s[self._index]

    def _positions(self, values: torch.Tensor) -> torch.Tensor:
        where = torch.empty_like(self.stored)
        where[self.stored] = torch.arange(len(self.stored), device=where.device)
        return where[values]

    def factors(self, values: torch.Tensor):
        """(U columns, singular values, Vt rows) of the given values, in that order. Continuous
        masks rank values but are not folded in: on the demo the trained s x mask made worse
        models than the original values, at the pass's final size and far worse above it, where
        dead values come back beside shrunken alive ones (docs/BENCHMARKS.md)."""
        take = self._positions(values)
        return full(self.u)[:, take], self.s[values], full(self.v)[:, take].t()

    def allocate(self, device: torch.device) -> None:
        """Give a waiting layer empty tensors of its shapes on `device`, for its factors to be
        copied in (moving it, as `_apply` does, would copy out of the meta device)."""
        nn.Module._apply(self, lambda t: torch.empty_like(t, device=device), recurse=False)

    def _apply(self, fn, *args, **kwargs):
        if self.waiting:  # nothing to move yet: `allocate` gives it tensors
            return self
        super()._apply(fn, *args, **kwargs)
        self.compact()  # the cached index follows the buffers to their device
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self._index)
        mask = self.mask[self._index]
        gate = mask if self.continuous else 1.0 + (mask - mask.detach())  # straight-through: value 1
        h = (x @ self.v[:, :n]) * (self._s * gate).to(x.dtype)
        y = F.linear(h, self.u[:, :n], self.bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale
        return y

    def on_death(self) -> None:
        self.compact()
