"""Settings of a structured prune."""

from __future__ import annotations

from dataclasses import dataclass

from ..units import UnitConfig


@dataclass
class PruneConfig(UnitConfig):
    """Prune MLP channels (and optionally key/value head groups) of the chosen decoder blocks
    (`ratio`, `heads_ratio`, `layers`, `quantize`: see `UnitConfig`; `layers="all"` keeps the
    architecture). `method`: "activation" scores a unit by its output weights times the norm of
    its activation on calibration text (Wanda-sp / FLAP, one forward sweep over `batch_size`
    windows at a time); "magnitude" by its weights alone and needs no data."""

    layers: str | list[int] | dict[int, float] = "all"  # the same architecture
    method: str = "activation"
    batch_size: int = 4

    verb = "prune"
    methods = ("activation", "magnitude")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"
