"""Vectorized k-means in torch: random projection to a few hundred dimensions, seeding by
merging mutual nearest neighbours, then Lloyd iterations. Deterministic per seed.

Folding keeps most units (k close to n), where k-means++ seeding needs k sequential steps and
scikit-learn's KMeans took tens of minutes on the demo model (DESIGN.md section 4). Merging the
closest mutual-nearest-neighbour pairs a round at a time reaches k clusters in a few batched
rounds and leaves the far-apart units alone, which is what a good seeding for k ~ n should do.
"""

from __future__ import annotations

import math

import torch


def project(points: torch.Tensor, dims: int, seed: int) -> torch.Tensor:
    """A Gaussian random projection to `dims` dimensions: it keeps pairwise distances to within
    a few percent (Johnson-Lindenstrauss), which is what k-means looks at, for one matmul."""
    x = points.float()
    if x.shape[1] <= dims:
        return x
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(x.shape[1], dims, generator=generator).to(x.device) / math.sqrt(dims)
    return x @ projection


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 20, dims: int = 256) -> torch.Tensor:
    """Cluster the rows of `points` (n x d) into `k` groups; returns labels in [0, k)."""
    n = len(points)
    if k >= n:
        return torch.arange(n, device=points.device)
    x = project(points, dims, seed)
    squared = (x * x).sum(1)

    def distances(centers: torch.Tensor) -> torch.Tensor:
        return (squared[:, None] - 2 * x @ centers.t() + (centers * centers).sum(1)).clamp_min_(0)

    centers = _merge_seed(x, k)
    labels = None
    for _ in range(iterations):
        new_labels = distances(centers).argmin(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = torch.where((counts == 0)[:, None], centers, sums / counts.clamp_min(1)[:, None])
    return _fill_empty(labels, distances(centers), k)


def _merge_seed(x: torch.Tensor, k: int) -> torch.Tensor:
    """k centers: rounds of merging the closest mutual nearest neighbours (pairs of groups)."""
    labels = torch.arange(len(x), device=x.device)
    groups = len(x)
    while groups > k:
        counts = torch.bincount(labels, minlength=groups).float()[:, None]
        centers = torch.zeros(groups, x.shape[1], device=x.device).index_add_(0, labels, x) / counts
        d = _pairwise(centers)
        d.fill_diagonal_(float("inf"))
        nearest_d, nearest = d.min(1)
        ids = torch.arange(groups, device=x.device)
        mutual = (nearest[nearest] == ids) & (ids < nearest)  # each mutual pair once
        order = nearest_d[mutual].argsort()[: groups - k]
        first, second = ids[mutual][order], nearest[mutual][order]
        merged_into = ids.clone()
        merged_into[second] = first
        _, merged_into = torch.unique(merged_into, return_inverse=True)  # renumber 0..groups'-1
        labels = merged_into[labels]
        groups -= len(order)
    counts = torch.bincount(labels, minlength=k).float()[:, None]
    return torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x) / counts


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
