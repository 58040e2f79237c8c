"""Data-free folding: cluster structurally similar units of a block and merge each cluster.

Units (MLP channels, key/value head groups) and how merged units are written back are
`units.py`'s; folding clusters them with k-means on their input-side rows, each weighted by the
squared norm of its output-side columns (`units.output_weights`), so the merged rows are the
members' weighted mean and the merged columns their sum.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..allocate import planned_sites, random_windows
from ..units import Magnitude, Selection, output_weights, shrink, shrink_site, weighted_means
from .config import FoldConfig
from .kmeans import kmeans


class KMeansFold(Selection):
    """Weighted k-means clusters; optionally each merged unit's rows rescaled by `variance_scale`."""

    def __init__(self, config: FoldConfig):
        self.config = config

    def labels(self, index, site, inputs, outputs, k):
        weights = output_weights(outputs)
        labels = kmeans(inputs, k, self.config.seed, self.config.iterations, weights=weights)
        return drop_misfits(inputs, labels, weights, k) if self.config.drop_misfits else labels

    def row_scale(self, rows, labels, k):
        return variance_scale(rows, labels, k)[:, None] if self.config.variance_correction else 1.0


def drop_misfits(inputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Drop (label -1) each unit whose rows lie farther from its cluster's center than from zero:
    merged, its column would carry the center's activation instead of its own, which costs more
    than removing it. The heaviest member of every cluster stays, so k units remain."""
    centers = weighted_means(inputs, labels, weights, k)
    misfit = (inputs - centers[labels]).pow(2).sum(1) > inputs.pow(2).sum(1)
    heaviest = torch.full((k,), -1.0, device=inputs.device).scatter_reduce(0, labels, weights, "amax")
    misfit &= weights < heaviest[labels]
    return torch.where(misfit, -1, labels)


def variance_scale(rows: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """sqrt(N / (1 + (N - 1) c)) per cluster, c = mean pairwise cosine of its members' rows: a
    mean of N units has a smaller norm than its members unless they are parallel (the folding
    paper's data-free Fold-AR repair, with the cosine in place of the activations' correlation)."""
    kept = labels >= 0
    z = torch.nn.functional.normalize(rows[kept], dim=1)
    sums = torch.zeros(k, z.shape[1], device=z.device).index_add_(0, labels[kept], z)
    counts = torch.bincount(labels[kept], minlength=k).float()
    pairs = (counts * (counts - 1)).clamp_min(1)
    cosine = ((sums.pow(2).sum(1) - counts) / pairs).clamp(0, 1)
    return torch.where(counts > 1, (counts / (1 + (counts - 1) * cosine)).sqrt(), torch.ones_like(counts))


def selection(config: FoldConfig) -> Selection:
    return Magnitude() if config.method == "magnitude" else KMeansFold(config)


def fold_site(block, site, ratio: float, config: FoldConfig, multiple: int = 1) -> int:
    """Fold one site of one block in place; returns the number of units kept."""
    return shrink_site(block, 0, site, ratio, selection(config), multiple)


def fold(model: PreTrainedModel, config: FoldConfig | None = None, show_progress: bool = True,
         **overrides) -> PreTrainedModel:
    """Fold `model` in place and return it (quantized, a new model, if `quantize` is set).
    Folding every block at one ratio (layers="all") keeps the architecture (smaller
    intermediate_size / head counts, no remote code needed); any other schedule records
    per-layer shapes for the self-contained checkpoint format. The "global" allocation probes
    the blocks with random token ids: still no data."""
    config = config or FoldConfig(**overrides)
    chosen = selection(config)
    found = planned_sites(model, config, chosen, random_windows(model, seed=config.seed), show_progress)
    return shrink(model, config, chosen, found, show_progress)
