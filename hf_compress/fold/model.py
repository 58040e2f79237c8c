"""Data-free folding: cluster structurally similar units of a block and merge each cluster.

Units (MLP channels, key/value head groups) and how merged units are written back are
`units.py`'s; folding clusters them with k-means on their input-side rows, each weighted by the
squared norm of its output-side columns (`units.output_weights`), so the merged rows are the
members' weighted mean and the merged columns their sum.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from ..allocate import planned_sites, random_windows
from ..units import Selection, output_weights, shrink, shrink_site
from .config import FoldConfig
from .kmeans import kmeans


class KMeansFold(Selection):
    """Weighted k-means clusters of a site's units."""

    def __init__(self, config: FoldConfig):
        self.config = config

    def labels(self, index, site, inputs, outputs, k):
        return kmeans(inputs, k, self.config.seed, self.config.iterations, weights=output_weights(outputs))


def fold_site(block, site, ratio: float, config: FoldConfig, multiple: int = 1) -> int:
    """Fold one site of one block in place; returns the number of units kept."""
    return shrink_site(block, 0, site, ratio, KMeansFold(config), multiple)


def fold(model: PreTrainedModel, config: FoldConfig | None = None, show_progress: bool = True,
         **overrides) -> PreTrainedModel:
    """Fold `model` in place and return it (quantized, a new model, if `quantize` is set).
    Folding every block at one ratio (layers="all") keeps the architecture (smaller
    intermediate_size / head counts, no remote code needed); any other schedule records
    per-layer shapes for the self-contained checkpoint format. The "global" allocation probes
    the blocks with random token ids: still no data."""
    config = config or FoldConfig(**overrides)
    chosen = KMeansFold(config)
    found = planned_sites(model, config, chosen, random_windows(model, seed=config.seed), show_progress)
    return shrink(model, config, chosen, found, show_progress)
