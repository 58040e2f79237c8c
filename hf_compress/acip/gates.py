"""Masks on whole units beside the singular values: MLP channels and key/value head groups.

A `UnitGate` holds one mask per unit of one site (`units.Site`: a block's MLP or attention) and
multiplies the unit's share of the input of the layer the site writes through (down_proj's
columns, o_proj's head columns) by a straight-through 1 while the unit is alive, 0 once dead:
the gate's gradient is then the first-order change of the loss if the unit went, the same
quantity a singular value's mask gets, so the objective moves both kinds with one rule and one
strength, each unit drained in proportion to the parameters it holds. The pass ranks them in
one order; `CompressibleModel` removes whatever is cheapest at each size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HfCompressError
from ..layers import LayerShape, decoder_blocks
from ..shrink.sites import HEAD_COUNTS, Segment, Site, attention_site, mlp_site
from .layer import Ranked



@dataclass(frozen=True)
class SiteRef:
    """Where a site's units live in the model: the block path prefix and the site."""

    prefix: str  # e.g. "model.layers.3."
    site: Site

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.site.kind}"

    @property
    def units(self) -> int:
        return self.site.reads[0].units

    def segments(self):
        """(full layer name, segment, side) of every segment: side "out" for rows, "in" for columns."""
        for seg in self.site.reads:
            yield f"{self.prefix}{seg.module}", seg, "out"
        for seg in self.site.writes:
            yield f"{self.prefix}{seg.module}", seg, "in"

    def to_json(self) -> dict:
        segment = lambda s: [s.module, s.start, s.units, s.per_unit]  # noqa: E731
        return {"prefix": self.prefix, "kind": self.site.kind, "reads": [segment(s) for s in self.site.reads],
                "writes": [segment(s) for s in self.site.writes]}

    @classmethod
    def from_json(cls, data: dict) -> SiteRef:
        segments = lambda items: tuple(Segment(*item) for item in items)  # noqa: E731
        return cls(data["prefix"], Site(data["kind"], segments(data["reads"]), segments(data["writes"])))


def unit_sites(model: nn.Module, units: str, targets: dict[str, LayerShape]) -> list[SiteRef]:
    """The sites whose units the pass ranks: every block's MLP ("channels"), and its attention
    ("all") where the architecture allows per-block head counts and a block has several
    key/value groups. Only sites whose layers are all targeted (their savings are counted)."""
    if units == "values":
        return []
    prefix, blocks = decoder_blocks(model)
    text_config = model.config.get_text_config()
    found = []
    for index, block in enumerate(blocks):
        candidates = [lambda: mlp_site(block, "rank")]
        if units == "all" and not any(hasattr(getattr(block, "self_attn", None), n) for n in HEAD_COUNTS):
            candidates.append(lambda: attention_site(block, text_config, "rank"))
        for make in candidates:
            try:
                site = make()
            except HfCompressError:  # a layout without such units (say, fused q/k/v): values only there
                continue
            ref = SiteRef(f"{prefix}.{index}.", site)
            if ref.units > 1 and all(name in targets for name, _, _ in ref.segments()):
                found.append(ref)
    return found


def unit_cost(ref: SiteRef, shapes: dict[str, LayerShape]) -> int:
    """Dense parameters one unit holds: its rows and columns in every layer of the site."""
    return sum(seg.per_unit * (shapes[name].in_features if side == "out" else shapes[name].out_features)
               for name, seg, side in ref.segments())


class UnitGate(Ranked):
    """One mask per unit of a site, applied to the input of the layers it writes through."""

    def __init__(self, ref: SiteRef, cost: int, mask_init: float):
        super().__init__(torch.full((ref.units,), mask_init), cost)
        self.ref = ref

    def gate(self, x: torch.Tensor, seg: Segment) -> torch.Tensor:
        """`x` (the written layer's input) with each unit's columns scaled by its gate."""
        gate = self.alive * (1.0 + (self.mask - self.mask.detach()))  # straight-through 1, 0 when dead
        columns = torch.ones(x.shape[-1], dtype=gate.dtype, device=x.device)
        end = seg.start + seg.units * seg.per_unit
        columns = torch.cat([columns[:seg.start], gate.repeat_interleave(seg.per_unit), columns[end:]])
        return x * columns.to(x.dtype)


def attach_gates(model: nn.Module, refs: list[SiteRef], shapes: dict[str, LayerShape],
                 mask_init: float) -> dict[str, UnitGate]:
    """Put a gate on every site of `refs` in `model` (as a child of each written layer, so that
    DDP and FSDP see its mask) and return them by site name."""
    gates = {}
    for ref in refs:
        gate = UnitGate(ref, unit_cost(ref, shapes), mask_init).to(next(model.parameters()).device)
        for name, seg, side in ref.segments():
            if side == "in":
                layer = model.get_submodule(name)
                layer.unit_gate = gate
                layer.register_forward_pre_hook(lambda module, args, seg=seg: (module.unit_gate.gate(args[0], seg),
                                                                             *args[1:]))
        gates[ref.name] = gate
    return gates


def widths(shapes: dict[str, LayerShape], refs: list[SiteRef], kept: dict[str, float]) -> dict[str, tuple]:
    """(in, out) of every layer when each site keeps `kept[site name]` units (fractional for the
    controller's soft size); layers of no site keep theirs."""
    sizes = {name: [float(shape.in_features), float(shape.out_features)] for name, shape in shapes.items()}
    for ref in refs:
        removed = ref.units - kept[ref.name]
        for name, seg, side in ref.segments():
            sizes[name][0 if side == "in" else 1] -= removed * seg.per_unit
    return {name: tuple(size) for name, size in sizes.items()}
