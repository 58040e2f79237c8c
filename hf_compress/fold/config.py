"""Settings of a data-free fold."""

from __future__ import annotations

from dataclasses import dataclass

from ..units import UnitConfig


@dataclass
class FoldConfig(UnitConfig):
    """Fold MLP channels (and optionally attention head groups) of the chosen decoder blocks
    (`ratio`, `heads_ratio`, `layers`, `quantize`: see `UnitConfig`). The default schedule
    "global" measures each block's cost and folds the cheapest units first, wherever they are
    (`allocate.py`; docs/BENCHMARKS.md has it against fixed schedules on two model families);
    "all" keeps the architecture. `method="magnitude"` is the pruning baseline: keep
    the units with the largest weight norms and drop the rest. `variance_correction` rescales a
    merged unit's rows to its members' norm; `drop_misfits` drops a unit that is closer to zero
    than to its cluster's center instead of merging it."""

    layers: str | list[int] | dict[int, float] = "global"
    method: str = "kmeans"
    variance_correction: bool = False
    drop_misfits: bool = False
    seed: int = 0
    iterations: int = 20

    verb = "fold"
    methods = ("kmeans", "magnitude")
