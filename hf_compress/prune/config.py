"""Settings of a structured prune."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HfCompressError
from ..units import UnitConfig


@dataclass
class PruneConfig(UnitConfig):
    """Prune MLP channels (and optionally key/value head groups) of the chosen decoder blocks
    (`ratio`, `heads_ratio`, `layers`, `quantize`: see `UnitConfig`; `layers="all"` keeps the
    architecture). `method`: "activation" scores a unit by its output weights times the norm of
    its activation on calibration text (Wanda-sp / FLAP, one forward sweep over `batch_size`
    windows at a time); "magnitude" by its weights alone and needs no data; "torque" trains the
    weights for `max_steps` steps of `batch_size` windows (AdamW at `lr`) while exponential
    torque pulls the least important units to zero (`strength`: the pull on the first unit to
    be pruned over the run, in its own norms; prune/torque.py)."""

    layers: str | list[int] | dict[int, float] = "all"  # the same architecture
    method: str = "activation"
    batch_size: int = 4
    max_steps: int = 100
    lr: float = 1e-5
    strength: float = 0.25
    save_every: int = 10
    gradient_checkpointing: bool = True
    seed: int = 0

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
