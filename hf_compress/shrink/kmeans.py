"""Folding's selection: cluster structurally similar units of a site and merge each cluster.
Weighted k-means in torch on the units' input-side rows, each weighted by the squared norm of
its output-side columns (`rewrite.output_weights`), so that the merged rows are the members'
weighted mean and the merged columns their sum: random projection to a few hundred dimensions,
seeding by rounds of pairing close units, then Lloyd iterations. Deterministic per seed.

Folding keeps most units (k close to n), where k-means++ seeding needs k sequential steps and
scikit-learn's KMeans took tens of minutes on the demo model. Pairing the
closest units a round at a time reaches k clusters in a few batched rounds and leaves the
far-apart units alone, which is what a good seeding for k ~ n should do.
"""

from __future__ import annotations

import math

import torch

from .config import FoldConfig
from .rewrite import output_weights, weighted_means
from .selection import Selection


class KMeansFold(Selection):
    """Weighted k-means clusters of a site's units."""

    def __init__(self, config: FoldConfig):
        self.config = config

    def labels(self, index, site, inputs, outputs, k):
        return kmeans(inputs, k, self.config.seed, self.config.iterations, weights=output_weights(outputs))

    def expert_groups(self, model, layers, k, data, show_progress=True):
        """Experts clustered by all their weights (the folding paper's merge: each cluster's mean)."""
        groups = []
        for layer in layers:
            labels = kmeans(layer.features(), k, self.config.seed, self.config.iterations)
            groups.append([(labels == label).nonzero().flatten() for label in range(k)])
        return groups


def project(points: torch.Tensor, dims: int, seed: int) -> torch.Tensor:
    """A Gaussian random projection to `dims` dimensions: it keeps pairwise distances to within
    a few percent (Johnson-Lindenstrauss), which is what k-means looks at, for one matmul. Few
    points (head groups) are cheaper to cluster as they are."""
    x = points.float()
    if min(x.shape) <= dims:
        return x
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(x.shape[1], dims, generator=generator).to(x.device) / math.sqrt(dims)
    return x @ projection


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 20, dims: int = 256,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster the rows of `points` (n x d) into `k` groups minimizing the weighted squared
    distance to the centers (each center the weighted mean of its members); returns labels."""
    n = len(points)
    if k >= n:
        return torch.arange(n, device=points.device)
    x = project(points, dims, seed)
    weights = torch.ones(n, device=x.device) if weights is None else weights.float().clamp_min(1e-12)
    squared = (x * x).sum(1)

    def distances(centers: torch.Tensor) -> torch.Tensor:
        return (squared[:, None] - 2 * x @ centers.t() + (centers * centers).sum(1)).clamp_min_(0)

    labels = _pair_seed(x, k, weights)
    centers = weighted_means(x, labels, weights, k)
    for _ in range(iterations):
        new_labels = distances(centers).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        empty = torch.bincount(labels, minlength=k) == 0
        centers = torch.where(empty[:, None], centers, weighted_means(x, labels, weights, k))
    return _fill_empty(labels, distances(centers), k)


CANDIDATES = 8  # nearest neighbours a group may pair with in one seeding round


def _pair_seed(x: torch.Tensor, k: int, weights: torch.Tensor) -> torch.Tensor:
    """Labels of k groups: rounds of greedy matching (closest candidate pairs first, each group
    paired at most once a round) until k groups are left. Letting every group join its nearest
    neighbour instead makes the few units near the origin, which are everybody's nearest
    neighbour, absorb the rest one round at a time: hundreds of rounds and a worse fold."""
    labels = torch.arange(len(x), device=x.device)
    groups = len(x)
    while groups > k:
        d = _pairwise(weighted_means(x, labels, weights, groups))
        d.fill_diagonal_(float("inf"))
        nearest_d, nearest = d.topk(min(CANDIDATES, groups - 1), dim=1, largest=False)
        order = nearest_d.flatten().argsort()
        merged_into, taken, merges = list(range(groups)), [False] * groups, 0
        for a, b in zip((order // nearest.shape[1]).tolist(), nearest.flatten()[order].tolist()):
            if taken[a] or taken[b]:
                continue
            taken[a] = taken[b] = True
            merged_into[max(a, b)] = min(a, b)
            merges += 1
            if merges == groups - k:
                break
        _, renumbered = torch.unique(torch.tensor(merged_into, device=x.device), return_inverse=True)
        labels = renumbered[labels]
        groups -= merges
    return labels


def _pairwise(points: torch.Tensor) -> torch.Tensor:
    squared = (points * points).sum(1)
    return (squared[:, None] - 2 * points @ points.t() + squared).clamp_min_(0)


def _fill_empty(labels: torch.Tensor, distances: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k groups: an empty cluster takes the worst-fitting point of a shared cluster."""
    labels = labels.clone()
    for empty in (torch.bincount(labels, minlength=k) == 0).nonzero().flatten().tolist():
        shared = torch.bincount(labels, minlength=k)[labels] > 1
        misfit = distances.gather(1, labels[:, None]).squeeze(1).masked_fill(~shared, -1)
        labels[misfit.argmax()] = empty
    return labels
