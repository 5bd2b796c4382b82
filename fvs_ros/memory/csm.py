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
   `tol` in total (sum of Euclidean shifts, as the official code measures it). The warm start is
   already a Lloyd fixed point in exact arithmetic (docs/memory.md, CUDA graph): the first
   iteration confirms it, later ones only settle near-ties that rounding decides.

Every centroid is a weighted mean of the points, c = A p with A [K, N] (rows: member weights /
mass), so all distances follow from the points' Gram matrix P P^T, carried in float64: the
clustering never touches the D-wide features, except to read the new frame's dot products with
the old centroids and to materialise the new centroids (A @ points) once. Vectors are relative to
a reference frame chosen by the caller, which keeps the Gram entries small (less cancellation).

A frame is absorbed in three stages over fixed buffers (`Absorption`, reused frame after frame):
start() (the frame's dot products, the Ward merge), iterate() (Lloyd iterations, in place; any
number of calls) and finish() (the new clusters). Fixed shapes, no host synchronisation. Once an
iteration converges the Lloyd state is frozen, so stopping as soon as `done` is true, however that
is read, gives the same result as running every iteration; the memory's CUDA graphs rely on it.
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
    span: Tensor  # [K, 2] float64, stamps of the earliest and the latest member (relative)

    @staticmethod
    def empty(k: int, dim: int, device: torch.device) -> Clusters:
        """K dead clusters, each field its own buffer (they are overwritten in place)."""

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return Clusters(
            torch.zeros(k, dim, device=device), zeros(k, k), zeros(k), zeros(k), zeros(k), zeros(k, 2)
        )

    def copy_(self, other: Clusters) -> None:
        """Overwrite these buffers with other's values."""
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name))

    @property
    def live(self) -> Tensor:  # [K] bool
        return self.mass > 0


@dataclass(frozen=True)
class Absorption:
    """Buffers of one frame's absorption, handed from stage to stage (fixed addresses: the memory
    replays the stages from CUDA graphs). The caller writes frame and slot_stamp; start() the rest."""

    frame: Tensor  # [D] float32, the new frame relative to the reference
    slot_stamp: Tensor  # [2] float64: its slot index and stamp (seconds, relative to the first frame)
    frame_sq: Tensor  # 0-d float64, |frame|^2
    dots: Tensor  # [K] float64, old centroids . frame
    gram: Tensor  # [K+1, K+1] float64, Gram matrix of the points [old centroids; frame]
    w: Tensor  # [K+1] float64, their weights (the frame's is 1)
    a: Tensor  # [K, K+1] float64, Lloyd's partition: centroid coefficients A
    mass: Tensor  # [K] float64, its cluster masses
    done: Tensor  # 0-d bool, Lloyd has converged: a and mass are frozen
    ids: Tensor  # [K, 1] int64, 0..K-1 (constant)
    points: Tensor  # [K+1] int64, 0..K (constant)
    not_pair: Tensor  # [K+1, K+1] bool, True on and below the diagonal (constant)

    @staticmethod
    def empty(k: int, dim: int, device: torch.device) -> Absorption:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        points = torch.arange(k + 1, device=device)
        return Absorption(
            frame=torch.zeros(dim, device=device),
            slot_stamp=zeros(2),
            frame_sq=zeros(),
            dots=zeros(k),
            gram=zeros(k + 1, k + 1),
            w=torch.cat([zeros(k), torch.ones(1, dtype=torch.float64, device=device)]),
            a=zeros(k, k + 1),
            mass=zeros(k),
            done=torch.zeros((), dtype=torch.bool, device=device),
            ids=points[:k, None].clone(),
            points=points,
            not_pair=~torch.ones(k + 1, k + 1, dtype=torch.bool, device=device).triu(1),
        )


def sq_dists_from_gram(gram: Tensor) -> Tensor:
    """|p_i - p_j|^2 from the Gram matrix [N, N] -> [N, N]."""
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)


def memberships(labels: Tensor, w: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Centroid coefficients A [k, N] (member weight / mass; zero rows when empty) and masses [k]
    of the partition labels [N] (values in 0..k-1; ids = [[0], ..., [k-1]])."""
    members = (labels[None, :] == ids).double()
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


def merge_cheapest_pair(ab: Absorption) -> Tensor:
    """Partition of the N points by merging the pair with the least Ward cost.

    Returns labels [N] in [0, N-1); ties go to the first pair in row-major order.
    """
    n, w = ab.gram.shape[0], ab.w
    cost = (
        (w[:, None] * w[None, :]) / (w[:, None] + w[None, :]).clamp_min(1e-300) * sq_dists_from_gram(ab.gram)
    )
    flat = cost.masked_fill_(ab.not_pair, float("inf")).view(-1).argmin()
    i, j = flat // n, flat % n  # i < j
    labels = torch.where(ab.points == j, i, ab.points)
    return labels - (labels > j).long()


def start(ab: Absorption, clusters: Clusters) -> None:
    """Stage 1 (ab.frame written by the caller): the frame's dot products with the old centroids,
    the points' Gram matrix and weights, and Lloyd's starting partition (the Ward merge)."""
    k = clusters.mass.shape[0]
    ab.frame_sq.copy_(ab.frame @ ab.frame)
    ab.dots.copy_(clusters.centers @ ab.frame)
    ab.gram[:k, :k] = clusters.gram
    ab.gram[:k, k] = ab.dots
    ab.gram[k, :k] = ab.dots
    ab.gram[k, k] = ab.frame_sq
    ab.w[:k] = clusters.mass
    a, mass = memberships(merge_cheapest_pair(ab), ab.w, ab.ids)
    ab.a.copy_(a)
    ab.mass.copy_(mass)
    ab.done.fill_(False)


def iterate(
    ab: Absorption, iters: int, tol: float, stop_early: Callable[[Tensor], bool] | None = None
) -> None:
    """Stage 2: `iters` weighted Lloyd iterations on ab.a and ab.mass, in place.

    One iteration = assign each point to its nearest live centroid, then recompute the weighted
    means. The state freezes once an iteration moves the centroids less than `tol` in total (ab.done);
    `stop_early(done)` may end the loop sooner but only once `done` is true.
    """
    for _ in range(iters):
        d = center_sq_dists(ab.gram, ab.a).masked_fill_(ab.mass[None, :] <= 0, float("inf"))  # dead: mass 0
        new_a, new_mass = memberships(d.argmin(1), ab.w, ab.ids)
        settled = total_shift(ab.gram, new_a, ab.a) < tol
        torch.where(ab.done, ab.a, new_a, out=ab.a)
        torch.where(ab.done, ab.mass, new_mass, out=ab.mass)
        ab.done.logical_or_(settled)
        if stop_early is not None and stop_early(ab.done):
            break


def finish(ab: Absorption, clusters: Clusters) -> Clusters:
    """Stage 3: the new clusters (fresh tensors, but mass is ab.mass): centroids A @ [old centroids;
    frame], their Gram matrix, times, stamps and spans (a cluster spans its members' spans)."""
    k = clusters.mass.shape[0]
    a32 = ab.a.float()
    slot, stamp = ab.slot_stamp
    member = ab.a > 0  # [K, K+1]; dead points (weight 0) are members of nothing
    first = torch.where(member, torch.cat([clusters.span[:, 0], stamp[None]]), float("inf")).amin(1)
    last = torch.where(member, torch.cat([clusters.span[:, 1], stamp[None]]), float("-inf")).amax(1)
    return Clusters(  # addmm_ accumulates into its input: addmm's arithmetic without copying [K, D]
        centers=(a32[:, k:] * ab.frame[None, :]).addmm_(a32[:, :k], clusters.centers),
        gram=ab.a @ ab.gram @ ab.a.T,
        mass=ab.mass,
        time=ab.a @ torch.cat([clusters.time, slot[None]]),
        stamp=ab.a @ torch.cat([clusters.stamp, stamp[None]]),
        span=torch.stack([first, last], 1),
    )
