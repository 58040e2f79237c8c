"""Settings of a data-free fold."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import HfCompressError
from ..quantize import check_method

METHODS = ("kmeans", "magnitude")
SCHEDULES = ("middle", "all")


@dataclass
class FoldConfig:
    """Fold MLP channels (and optionally attention head groups) of the chosen decoder blocks.

    `ratio` is the fraction of MLP channels kept in each folded block, `heads_ratio` the fraction
    of key/value head groups kept (1.0 leaves attention alone). `layers` is the schedule:
    "middle" (default) folds every block but the first two and the last two, which the benchmark
    found to be where folding hurts most (docs/BENCHMARKS.md); "all" folds every block, which
    keeps the architecture (no remote code to load it); a list of block indices folds those at
    `ratio`; a {block: ratio} dict sets the MLP ratio per block. `method="magnitude"` is the
    pruning baseline: keep the units with the largest weight norms and drop the rest. `quantize`
    quantizes the folded model with bitsandbytes.
    """

    ratio: float = 0.9
    heads_ratio: float = 1.0
    layers: str | list[int] | dict[int, float] = "middle"
    method: str = "kmeans"
    variance_correction: bool = False
    seed: int = 0
    iterations: int = 20
    quantize: str | None = None  # nf4, fp4, int8: folded widths rounded to what the kernel packs
    quantize_head: bool = False

    def __post_init__(self):
        ratios = {"ratio": self.ratio, "heads ratio": self.heads_ratio}
        if isinstance(self.layers, dict):
            ratios |= {f"ratio of block {index}": ratio for index, ratio in self.layers.items()}
        for name, value in ratios.items():
            if not 0 < value <= 1:
                raise HfCompressError(f"{name} must be in (0, 1], got {value}")
        if self.method not in METHODS:
            raise HfCompressError(f"fold method must be one of {METHODS}, not '{self.method}'")
        if self.quantize is not None:
            check_method(self.quantize)
        if isinstance(self.layers, str) and self.layers not in SCHEDULES:
            raise HfCompressError(f"fold layers must be one of {SCHEDULES}, a list of blocks or a "
                                  f"{{block: ratio}} dict, not '{self.layers}'")

    def schedule(self, n_blocks: int) -> dict[int, float]:
        """The MLP ratio of each block to fold."""
        if self.layers == "all":
            return dict.fromkeys(range(n_blocks), self.ratio)
        if self.layers == "middle":
            edge = min(2, (n_blocks - 1) // 4)  # tiny test models: fold every block
            return dict.fromkeys(range(edge, n_blocks - edge), self.ratio)
        plan = self.layers if isinstance(self.layers, dict) else dict.fromkeys(self.layers, self.ratio)
        plan = {int(index): ratio for index, ratio in plan.items()}
        if not plan or min(plan) < 0 or max(plan) >= n_blocks:
            raise HfCompressError(f"fold layers must be block indices in [0, {n_blocks}), got {sorted(plan)}")
        return dict(sorted(plan.items()))

    def to_dict(self) -> dict:
        return asdict(self)
