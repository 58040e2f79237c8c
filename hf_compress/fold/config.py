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
    "all" keeps the architecture. The pruning baseline on the same units is
    `prune(method="magnitude")`."""

    layers: str | list[int] | dict[int, float] = "global"
    seed: int = 0
    iterations: int = 20

    verb = "fold"
