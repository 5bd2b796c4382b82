"""Context Synopsis Memory (CSM): weighted k-means over memory slots, one new frame at a time.

The CSM holds K clusters of low-resolution slot vectors. A cluster carries its centroid (the
weighted mean of its members), its mass (frames absorbed) and the mass-weighted mean slot index
and stamp of those frames. A cluster of mass 0 is *dead*: a free slot, excluded everywhere.

Absorbing a frame clusters N = K+1 weighted points (the K old centroids with their masses, plus
the frame with weight 1) back into K clusters:

1. warm start: merge the single pair of points whose merge raises the k-means cost least (Ward's
   criterion w_a w_b / (w_a + w_b) * |a - b|^2). A dead slot costs nothing to merge, so while
   fewer than K frames have been seen every frame keeps its own centroid; afterwards a frame
   unlike anything in memory keeps its own cluster (two similar old clusters merge instead).
2. refine with weighted Lloyd iterations (at most `iters`) until the centroids move less than
   `tol` in total (sum of Euclidean shifts, as the official code measures it).

Every centroid is a weighted mean of the points, c = A p with A [K, N] (rows: member weights /
mass), so all distances follow from the points' Gram matrix P P^T, carried in float64: the
clustering never touches the D-wide features, except to read the new frame's dot products with
the old centroids and to materialise the new centroids (A @ points) once. Vectors are relative to
a reference frame chosen by the caller, which keeps the Gram entries small (less cancellation).

Fixed shapes, no host synchronisation: the optional early-exit probe never changes the result
(once converged the state is frozen, so stopping early or running all iterations is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Clusters:
    """CSM state. absorb() returns a new object; the memory keeps its state in one set of
    buffers and copy_()s each result into them (a CUDA graph replays into fixed addresses)."""

    centers: Tensor  # [K, D] float32, relative to the reference frame; zeros for dead clusters
    gram: Tensor  # [K, K] float64, centers @ centers.T (carried through the updates)
    mass: Tensor  # [K] float64, frames absorbed (exact integers); 0 = dead
    time: Tensor  # [K] float64, mass-weighted mean slot index of the members
    stamp: Tensor  # [K] float64, mass-weighted mean stamp (seconds, relative to the first frame)

    @staticmethod
    def empty(k: int, dim: int, device: torch.device) -> Clusters:
        """K dead clusters, each field its own buffer (they are overwritten in place)."""
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return Clusters(torch.zeros(k, dim, device=device), zeros(k, k), zeros(k), zeros(k), zeros(k))

    def copy_(self, other: Clusters) -> None:
        """Overwrite these buffers with other's values."""
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name))

    @property
    def live(self) -> Tensor:  # [K] bool
        return self.mass > 0


def sq_dists_from_gram(gram: Tensor) -> Tensor:
    """|p_i - p_j|^2 from the Gram matrix [N, N] -> [N, N]."""
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)


def bordered(gram: Tensor, dots: Tensor, sq: Tensor) -> Tensor:
    """Gram matrix [K+1, K+1] of K points (gram [K, K]) and one more (dots [K] with them, sq = |x|^2)."""
    col = torch.cat([dots, sq[None]])
    return torch.cat([torch.cat([gram, dots[None]]), col[:, None]], 1)


def memberships(labels: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Centroid coefficients A [k, N] (member weight / mass; zero rows when empty) and masses [k]."""
    members = (labels[None, :] == torch.arange(k, device=labels.device)[:, None]).double()
    mass = members @ w
    return members * w / mass.clamp_min(1)[:, None], mass


def center_sq_dists(gram: Tensor, a: Tensor) -> Tensor:
    """|p_i - c_j|^2 for the points of `gram` [N, N] and centroids c = a p (a [k, N]) -> [N, k]."""
    dots = a @ gram  # [k, N]: c_j . p_i
    c_sq = (dots * a).sum(1)
    return (gram.diagonal()[:, None] - 2 * dots.T + c_sq[None, :]).clamp_min_(0)


def total_shift(gram: Tensor, a_new: Tensor, a_old: Tensor) -> Tensor:
    """Sum over centroids of |c_new - c_old| (0-d)."""
    delta = a_new - a_old
    return ((delta @ gram) * delta).sum(1).clamp_min_(0).sqrt().sum()


def merge_cheapest_pair(gram: Tensor, w: Tensor) -> Tensor:
    """Partition of N points into N-1 groups by merging the pair with the least Ward cost.

    Returns labels [N] in [0, N-1); ties go to the first pair in row-major order.
    """
    n = gram.shape[0]
    cost = (w[:, None] * w[None, :]) / (w[:, None] + w[None, :]).clamp_min(1e-300) * sq_dists_from_gram(gram)
    cost = cost.masked_fill_(~torch.ones(n, n, dtype=torch.bool, device=gram.device).triu(1), float("inf"))
    flat = cost.view(-1).argmin()
    i, j = flat // n, flat % n  # i < j
    labels = torch.arange(n, device=gram.device)
    labels = torch.where(labels == j, i, labels)
    return labels - (labels > j).long()


def lloyd(gram: Tensor, w: Tensor, labels: Tensor, k: int, iters: int, tol: float,
          stop_early: Callable[[Tensor], bool]) -> tuple[Tensor, Tensor]:
    """Weighted Lloyd iterations from a partition -> (A [k, N], mass [k]) of the final partition.

    One iteration = assign each point to its nearest live centroid, then recompute the weighted
    means. The state freezes once an iteration moves the centroids less than `tol` in total;
    `stop_early(done)` may end the loop sooner but only once `done` is true.
    """
    a, mass = memberships(labels, w, k)
    done = torch.zeros((), dtype=torch.bool, device=gram.device)
    for _ in range(iters):
        d = center_sq_dists(gram, a).masked_fill_(~(mass > 0)[None, :], float("inf"))
        new_a, new_mass = memberships(d.argmin(1), w, k)
        settled = total_shift(gram, new_a, a) < tol
        a = torch.where(done, a, new_a)
        mass = torch.where(done, mass, new_mass)
        done = done | settled
        if stop_early(done):
            break
    return a, mass


def absorb(clusters: Clusters, frame: Tensor, dots: Tensor, frame_sq: Tensor, slot: Tensor, stamp: Tensor,
           iters: int, tol: float, stop_early: Callable[[Tensor], bool]) -> tuple[Clusters, Tensor]:
    """Cluster the K old centroids (weighted) and one new frame back into K clusters.

    frame [D] float32 (relative to the reference); dots [K] float64 = clusters.centers @ frame;
    frame_sq, slot, stamp: 0-d float64 (|frame|^2, slot index, relative stamp).
    Returns the new clusters and A [K, K+1]: new centroids = A @ [old centroids; frame].
    """
    k = clusters.mass.shape[0]
    gram = bordered(clusters.gram, dots, frame_sq)  # [K+1, K+1]
    w = torch.cat([clusters.mass, torch.ones_like(clusters.mass[:1])])
    a, mass = lloyd(gram, w, merge_cheapest_pair(gram, w), k, iters, tol, stop_early)
    a32 = a.float()
    centers = torch.addmm(a32[:, k:] * frame[None, :], a32[:, :k], clusters.centers)
    return Clusters(
        centers=centers,
        gram=a @ gram @ a.T,
        mass=mass,
        time=a @ torch.cat([clusters.time, slot[None]]),
        stamp=a @ torch.cat([clusters.stamp, stamp[None]]),
    ), a
