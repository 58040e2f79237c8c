"""Settings of `fold` and `prune`: what they share (`ShrinkConfig`) and what each adds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import HfCompressError
from ..quantize import check_method

SCHEDULES = ("global", "middle", "all")


@dataclass
class ShrinkConfig:
    """What `fold` and `prune` share. `ratio` is the fraction of MLP channels kept in each
    shrunk block, `heads_ratio` the fraction of key/value head groups kept (1.0 leaves attention
    alone). `layers` is the schedule: "middle" (every block but the first two and the last two),
    "all" (every block: the architecture stays, no remote code to load it), a list of block
    indices at `ratio`, or a {block: ratio} dict; "global" (`allocate.py`) makes `ratio` and
    `heads_ratio` whole-model fractions and lets each block keep what its measured cost deserves.
    `experts_ratio` is the fraction of experts each mixture-of-experts layer keeps (`experts.py`).
    `quantize` quantizes the result with bitsandbytes (widths rounded to what its kernel packs).
    `seed` seeds what is random: k-means, the data-free probe, torque's data order."""

    ratio: float = 0.9
    heads_ratio: float = 1.0
    experts_ratio: float = 1.0
    layers: str | list[int] | dict[int, float] = "middle"
    quantize: str | None = None  # nf4, fp4, int8
    quantize_head: bool = False
    seed: int = 0

    verb = "shrink"  # what the operation is called in errors and records

    def __post_init__(self):
        ratios = {"ratio": self.ratio, "heads ratio": self.heads_ratio, "experts ratio": self.experts_ratio}
        if isinstance(self.layers, dict):
            ratios |= {f"ratio of block {index}": ratio for index, ratio in self.layers.items()}
        for name, value in ratios.items():
            if not 0 < value <= 1:
                raise HfCompressError(f"{name} must be in (0, 1], got {value}")
        if self.quantize is not None:
            check_method(self.quantize)
        if isinstance(self.layers, str) and self.layers not in SCHEDULES:
            raise HfCompressError(f"{self.verb} layers must be one of {SCHEDULES}, a list of blocks or a "
                                  f"{{block: ratio}} dict, not '{self.layers}'")

    def schedule(self, n_blocks: int) -> dict[int, float]:
        """The MLP ratio of each block to shrink (under "global", every block is a candidate)."""
        if self.layers in ("all", "global"):
            return dict.fromkeys(range(n_blocks), self.ratio)
        if self.layers == "middle":
            edge = min(2, (n_blocks - 1) // 4)  # tiny test models: every block
            return dict.fromkeys(range(edge, n_blocks - edge), self.ratio)
        plan = self.layers if isinstance(self.layers, dict) else dict.fromkeys(self.layers, self.ratio)
        plan = {int(index): ratio for index, ratio in plan.items()}
        if not plan or min(plan) < 0 or max(plan) >= n_blocks:
            raise HfCompressError(f"{self.verb} layers must be block indices in [0, {n_blocks}), got {sorted(plan)}")
        return dict(sorted(plan.items()))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldConfig(ShrinkConfig):
    """Fold MLP channels (and optionally attention head groups) data-free: k-means merges similar
    units (`kmeans.py`, `iterations` Lloyd steps). The default schedule "global" measures each
    block's cost and folds the cheapest units first, wherever they are (docs/BENCHMARKS.md has it
    against fixed schedules on two model families); "all" keeps the architecture."""

    layers: str | list[int] | dict[int, float] = "global"
    iterations: int = 20

    verb = "fold"


@dataclass
class PruneConfig(ShrinkConfig):
    """Prune MLP channels (and optionally key/value head groups); `layers="all"` keeps the
    architecture. `method`: "activation" scores a unit by its output weights times the norm of
    its activation on calibration text (Wanda-sp / FLAP, one forward sweep over `batch_size`
    windows at a time); "magnitude" by its weights alone and needs no data; "torque" trains the
    weights for `max_steps` steps of `batch_size` windows (AdamW at `lr`) while exponential
    torque pulls the least important units to zero (`strength`: the pull on the first unit to
    be pruned over the run, in its own norms; `torque.py`)."""

    layers: str | list[int] | dict[int, float] = "all"  # the same architecture
    method: str = "activation"
    batch_size: int = 4
    max_steps: int = 100
    lr: float = 1e-5
    strength: float = 0.25
    save_every: int = 10
    gradient_checkpointing: bool = True

    verb = "prune"
    methods = ("activation", "magnitude", "torque")

    def __post_init__(self):
        super().__post_init__()
        if self.method not in self.methods:
            raise HfCompressError(f"prune method must be one of {self.methods}, not '{self.method}'")
        if self.max_steps < 1 or self.save_every < 1 or self.strength < 0 or self.lr < 0:
            raise HfCompressError("prune needs max_steps and save_every of at least 1, and strength and lr of at "
                                  "least 0")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"
