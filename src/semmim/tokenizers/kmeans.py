"""k-means in plain torch: k-means++ or random seeding, a fixed number of Lloyd iterations, l2 or cosine.

The points are held in memory (the caller bounds them: :func:`semmim.tokenizers.build.collect_tokens` keeps a
seeded uniform sample of a dataset's tokens); distances are computed in chunks of rows, so memory stays at
``chunk x k`` floats whatever the number of points. Everything draws from one seeded ``torch.Generator``: the
same points, ``k`` and seed give the same codebook.

* ``metric="l2"``: squared Euclidean distance, centroids are cluster means (Lloyd 1982).
* ``metric="cosine"``: points and centroids on the unit sphere, distance ``2 - 2 cos`` (the squared chord),
  centroids are normalised cluster means (spherical k-means, Dhillon & Modha 2001).
* ``init="kmeans++"``: D^2 seeding (Arthur & Vassilvitskii 2007); ``init="random"``: k distinct points.
* A centroid left without points ("dead") is re-seeded at the point farthest from its own centroid (the next
  farthest for the next dead one), so every code stays in use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("cosine", "l2")
INITS = ("kmeans++", "random")


@dataclass
class KMeansResult:
    """The outcome of :func:`kmeans`.

    Attributes:
        centroids: (K, D) float32 (unit norm for ``cosine``).
        counts: (K,) int64 points assigned to each centroid by the final centroids.
        inertia: mean distance of a point to its centroid (squared l2, or ``2 - 2 cos``).
        iterations: Lloyd iterations run (fewer than asked when the assignment stopped changing).
        reseeded: dead centroids re-seeded over all iterations.
    """

    centroids: Tensor
    counts: Tensor
    inertia: float
    iterations: int
    reseeded: int


def prepare(x: Tensor, metric: str) -> Tensor:
    """(n, D) points as float32, on the unit sphere for ``cosine``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    x = x.float()
    return F.normalize(x, dim=-1) if metric == "cosine" else x


def assign(x: Tensor, centroids: Tensor, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every point by squared l2 distance (points already :func:`prepare`\\ d).

    For unit vectors the squared l2 distance is ``2 - 2 cos``, so the same code serves both metrics.

    Args:
        x: (n, D) points.
        centroids: (K, D).
        chunk: rows per distance block.

    Returns:
        ids (n,) int64 and their distances (n,) float32.
    """
    c_sq = centroids.pow(2).sum(-1)
    ids, dist = [], []
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        d = (block.pow(2).sum(-1, keepdim=True) - 2.0 * block @ centroids.T + c_sq).clamp_min_(0.0)
        best, idx = d.min(dim=1)
        ids.append(idx)
        dist.append(best)
    return torch.cat(ids), torch.cat(dist)


def _init_random(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    return x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()


def _init_kmeanspp(x: Tensor, k: int, gen: torch.Generator, chunk: int) -> Tensor:
    n = x.shape[0]
    centers = torch.empty(k, x.shape[1], dtype=x.dtype)
    centers[0] = x[int(torch.randint(n, (1,), generator=gen))]
    closest = assign(x, centers[:1], chunk)[1]
    for i in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # every point sits on a centre already: fill the rest with distinct random points
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(closest.double() / total, 1, generator=gen))
        centers[i] = x[idx]
        closest = torch.minimum(closest, assign(x, centers[i : i + 1], chunk)[1])
    return centers


def kmeans(
    points: Tensor,
    k: int,
    iters: int = 20,
    metric: str = "cosine",
    init: str = "kmeans++",
    seed: int = 0,
    chunk: int = 16384,
) -> KMeansResult:
    """Cluster (n, D) points into ``k`` centroids.

    Args:
        points: (n, D) points (any float dtype; copied to float32).
        k: number of centroids (the codebook size), at most n.
        iters: Lloyd iterations (it stops earlier once no assignment changes and no centroid is dead).
        metric: "cosine" (spherical k-means) or "l2".
        init: "kmeans++" or "random".
        seed: seed of the initialisation.
        chunk: rows per distance block.

    Returns:
        :class:`KMeansResult`.

    Examples:
        >>> pts = torch.cat([torch.randn(50, 2) * 0.01 + torch.tensor(c) for c in ([5.0, 0.0], [0.0, 5.0])])
        >>> res = kmeans(pts, 2, metric="l2", seed=0)
        >>> sorted(res.counts.tolist())
        [50, 50]
    """
    if points.dim() != 2:
        raise ValueError(f"k-means takes (n, D) points, got shape {tuple(points.shape)}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if k < 1 or iters < 0:
        raise ValueError(f"k must be >= 1 and iters >= 0, got k={k}, iters={iters}")
    x = prepare(points, metric)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}: use more images or a smaller k")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means points contain NaN or Inf")
    gen = torch.Generator().manual_seed(int(seed))
    centroids = _init_kmeanspp(x, k, gen, chunk) if init == "kmeans++" else _init_random(x, k, gen)
    if metric == "cosine":
        centroids = F.normalize(centroids, dim=-1)
    reseeded, done = 0, 0
    previous: Tensor | None = None
    for _ in range(iters):
        ids, dist = assign(x, centroids, chunk)
        counts = torch.bincount(ids, minlength=k)
        dead = torch.nonzero(counts == 0).flatten()
        if previous is not None and dead.numel() == 0 and torch.equal(ids, previous):
            break  # converged: another update would not move anything
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        alive = counts > 0
        centroids = torch.where(alive[:, None], sums / counts.clamp_min(1)[:, None].to(sums.dtype), centroids)
        if dead.numel():  # re-seed each dead centroid at one of the points worst served now
            far = torch.topk(dist, dead.numel()).indices
            centroids[dead] = x[far]
            reseeded += int(dead.numel())
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=-1)
        previous = ids
        done += 1
    ids, dist = assign(x, centroids, chunk)
    return KMeansResult(
        centroids=centroids.contiguous(),
        counts=torch.bincount(ids, minlength=k),
        inertia=float(dist.mean()),
        iterations=done,
        reseeded=reseeded,
    )


def code_usage(counts: Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity ``exp(H)`` of the code histogram) for (K,) counts.

    The perplexity is K when every code is used equally often and 1 when one code takes everything.

    Examples:
        >>> code_usage(torch.tensor([5, 5, 0, 0]))
        (0.5, 2.0)
    """
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    return float((counts > 0).double().mean()), round(math.exp(entropy), 6)
