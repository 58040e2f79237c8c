"""Vectorized k-means in torch: PCA to a few hundred dimensions, k-means++ seeding, then Lloyd
iterations. Deterministic per seed.

Written here rather than taken from scikit-learn: with k close to n (folding keeps most
channels) sklearn's KMeans took tens of minutes on the demo model (DESIGN.md section 4).
"""

from __future__ import annotations

import torch


def _squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return ((points * points).sum(1, keepdim=True) - 2 * points @ centers.t()
            + (centers * centers).sum(1)).clamp_min_(0)


def project(points: torch.Tensor, dims: int, seed: int) -> torch.Tensor:
    """The rows' coordinates on their top `dims` principal directions (randomized PCA)."""
    x = points.float()
    if min(x.shape) <= dims:
        return x
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, _ = torch.pca_lowrank(x, q=dims, center=True, niter=2)
    return u * s


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 20, dims: int = 256) -> torch.Tensor:
    """Cluster the rows of `points` (n x d) into `k` groups; returns labels in [0, k).
    Distances are taken after PCA to `dims` dimensions, which keeps most of the spread."""
    n = len(points)
    if k >= n:
        return torch.arange(n, device=points.device)
    x = project(points, dims, seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = _squared_distances(x, x[chosen[-1]][None]).squeeze(1)
    for _ in range(k - 1):  # k-means++: next center drawn with probability ~ squared distance
        weights = nearest.cpu().double()
        if weights.sum() <= 0:
            weights = torch.ones(n, dtype=torch.double)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, _squared_distances(x, x[chosen[-1]][None]).squeeze(1))
    centers = x[chosen].clone()
    labels = None
    for _ in range(iterations):
        distances = _squared_distances(x, centers)
        new_labels = distances.argmin(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters with the points farthest from their center
            far = distances.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            centers[empty] = x[far[: int(empty.sum())]]
    return _fill_empty(labels, _squared_distances(x, centers), k)


def _fill_empty(labels: torch.Tensor, distances: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k groups: an empty cluster takes the worst-fitting point of a shared cluster."""
    labels = labels.clone()
    for empty in (torch.bincount(labels, minlength=k) == 0).nonzero().flatten().tolist():
        shared = torch.bincount(labels, minlength=k)[labels] > 1
        misfit = distances.gather(1, labels[:, None]).squeeze(1).masked_fill(~shared, -1)
        labels[misfit.argmax()] = empty
    return labels
