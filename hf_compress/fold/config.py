"""Settings of a data-free fold."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import HfCompressError

METHODS = ("kmeans", "magnitude")


@dataclass
class FoldConfig:
    """Fold MLP channels (and optionally attention head groups) of the chosen decoder blocks.

    `ratio` is the fraction of MLP channels kept in each folded block, `heads_ratio` the fraction
    of key/value head groups kept (1.0 leaves attention alone). `layers` lists the blocks to
    fold; None folds every block. `method="magnitude"` is the pruning baseline: keep the units
    with the largest weight norms and drop the rest. `protect` keeps that fraction of units with
    the largest norms out of the clustering (they stay as they are).
    """

    ratio: float = 0.9
    heads_ratio: float = 1.0
    layers: list[int] | None = None
    method: str = "kmeans"
    variance_correction: bool = False
    protect: float = 0.0
    seed: int = 0
    iterations: int = 20

    def __post_init__(self):
        for name in ("ratio", "heads_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise HfCompressError(f"{name.replace('_', ' ')} must be in (0, 1], got {getattr(self, name)}")
        if self.method not in METHODS:
            raise HfCompressError(f"fold method must be one of {METHODS}, not '{self.method}'")
        if not 0 <= self.protect < 1:
            raise HfCompressError(f"protect must be in [0, 1), got {self.protect}")

    def to_dict(self) -> dict:
        return asdict(self)
