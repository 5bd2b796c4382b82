"""Feature bank: the frames the DAM can retrieve, with a bounded retention rule.

Each retained frame keeps its low-resolution features (float32, relative to the memory's
reference frame) and their squared norm, its full-resolution features (model dtype, what DAM
hands to the LLM), its slot index and stamp. The bank also carries `cross` [K, rows] (float64),
the dot products of the CSM centroids with the held frames, updated with the centroids' mixing
matrix A on every frame; centroid-to-frame distances then cost no pass over the features.

Retention rule (capacity C, docs/memory.md): while fewer than C frames are held, every frame is
kept. Afterwards each new frame competes with the held ones and exactly one of the C+1 frames is
dropped. The newest C/4 frames are never dropped: a frame's worth shows only later, when the
centroid absorbing a slowly changing scene has moved towards it (the frame nearest to a centroid
at the end is rarely the one nearest when it arrived). Among the others the frame the current
centroids need least is dropped:

    protection(f) = min over live centroids k of rank_k(f)

where rank_k(f) is f's position (0 = nearest) in centroid k's list of frames sorted by low-res
distance: the frame with the largest protection goes (ties: the one farthest from every
centroid). capacity=None keeps every frame (the official, unbounded behaviour).

A bounded bank allocates its C rows up front (free rows are simply the first to go) and, once
full, runs the same fixed-shape device ops for every frame, with no host reads, writing its
buffers in place: an update costs the same at frame 10 and at frame 10 million, and the memory
can replay it from a CUDA graph. Buffers have one extra "discard" row: dropping the new frame
writes it there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .csm import Clusters

_GROWTH = 1.5  # unbounded bank: grow the buffers by this factor when full
_FIRST_ROWS = 64  # unbounded bank: rows allocated on the first frame
_ROWS = ("low", "sq", "full", "slot", "stamp")  # per-frame buffers, first dimension = rows


def _ranks(x: Tensor) -> Tensor:
    """Position of each entry in its row's ascending order (stable) -> [K, M] int64."""
    return x.argsort(dim=1, stable=True).argsort(dim=1, stable=True)


class FeatureBank:
    """Retained frames for DAM. Written only by the memory's writer; never shared with readers."""

    def __init__(self, capacity: int | None, device: torch.device):
        self.capacity = capacity
        self.device = device
        self.count = 0  # frames held, in rows [0, count)
        self.low: Tensor | None = None  # [rows+1, D] float32, relative to the reference frame
        self.sq: Tensor | None = None  # [rows+1] float64, |low|^2
        self.full: Tensor | None = None  # [rows+1, Nf, C] model dtype
        self.slot: Tensor | None = None  # [rows+1] int64
        self.stamp: Tensor | None = None  # [rows+1] float64, seconds relative to the first frame
        self.cross: Tensor | None = None  # [K, rows+1] float64, centroids . low

    @property
    def rows(self) -> int:
        """Allocated frame rows (the discard row excluded)."""
        return 0 if self.low is None else self.low.shape[0] - 1

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (getattr(self, name) for name in (*_ROWS, "cross")) if t is not None)

    def dots(self, frame: Tensor) -> Tensor:
        """Held frames . frame [D] -> [count] float64."""
        if self.count == 0:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return (self.low[: self.count] @ frame).double()

    def add(
        self,
        frame: Tensor,
        frame_sq: Tensor,
        frame_dots: Tensor,
        center_dots: Tensor,
        full: Tensor,
        slot: Tensor,
        stamp: Tensor,
        clusters: Clusters,
        mix: Tensor,
    ) -> None:
        """Offer one frame to the bank, right after the CSM absorbed it.

        frame [D] float32, frame_sq 0-d float64, frame_dots [count] = self.dots(frame), center_dots
        [K] = old centroids . frame, full [Nf, C], slot/stamp 0-d; clusters: the new CSM state,
        whose centroids are mix [K, K+1] @ [old centroids; frame].
        """
        k = mix.shape[0]
        if self.capacity is None:
            self._reserve(self.count + 1, frame, full, k)
        else:
            self._reserve(self.capacity, frame, full, k)
        n = self.count
        held = mix @ torch.cat([self.cross[:, :n], frame_dots[None]])  # [K, n]: new centroids . held frames
        new = mix @ torch.cat([center_dots, frame_sq[None]])  # [K]: new centroids . frame
        self.cross[:, :n] = held
        if self.capacity is None:
            row = torch.tensor([n], device=self.device)
            self.count += 1
        else:
            row = self._row_for(clusters, held, new, frame_sq, slot)
            self.count = min(n + 1, self.capacity)
        for name, value in zip(_ROWS, (frame, frame_sq, full, slot, stamp), strict=True):
            getattr(self, name).index_copy_(0, row, value[None])
        self.cross.index_copy_(1, row, new[:, None])

    def _row_for(
        self, clusters: Clusters, held: Tensor, new: Tensor, frame_sq: Tensor, slot: Tensor
    ) -> Tensor:
        """Row [1] the new frame (slot `slot`) goes to: the first free row while the bank fills up,
        then the row of the frame the retention rule drops (the discard row when that is the new
        frame, which can only happen with capacity < 4)."""
        cap, n = self.capacity, self.count
        c_sq = clusters.gram.diagonal()
        d = torch.zeros(c_sq.shape[0], cap + 1, dtype=torch.float64, device=self.device)
        d[:, :n] = c_sq[:, None] + self.sq[None, :n] - 2 * held
        d[:, cap] = c_sq + frame_sq - 2 * new  # [K, cap+1]; column cap: the new frame
        col = torch.arange(cap + 1, device=self.device)
        free = (col >= n) & (col < cap)  # column cap (the new frame) is never free
        d = d.masked_fill_(~clusters.live[:, None] | free[None, :], float("inf"))
        protection = _ranks(d).masked_fill_(~clusters.live[:, None], cap + 1).amin(0).double()
        newest = torch.cat([self.slot[:cap], slot[None]]) > slot - cap // 4
        protection = protection.masked_fill_(newest & ~free, -1).masked_fill_(free, cap + 2)
        nearest = d.amin(0).masked_fill_(free, 0)
        drop = (protection + nearest / (2 * nearest.amax() + 1e-30)).argmax()  # free rows first, lowest first
        return drop.view(1)

    def _reserve(self, rows: int, frame: Tensor, full: Tensor, k: int) -> None:
        """Make room for `rows` frames (a bounded bank allocates its capacity at once)."""
        if rows <= self.rows:
            return
        want = (
            self.capacity if self.capacity is not None else max(rows, _FIRST_ROWS, int(self.rows * _GROWTH))
        )
        if self.low is None:
            self.low = torch.zeros(want + 1, *frame.shape, device=self.device)
            self.sq = torch.zeros(want + 1, dtype=torch.float64, device=self.device)
            self.full = torch.zeros(want + 1, *full.shape, dtype=full.dtype, device=self.device)
            self.slot = torch.zeros(want + 1, dtype=torch.int64, device=self.device)
            self.stamp = torch.zeros(want + 1, dtype=torch.float64, device=self.device)
            self.cross = torch.zeros(k, want + 1, dtype=torch.float64, device=self.device)
            return
        for name in _ROWS:
            old = getattr(self, name)
            new = old.new_zeros(want + 1, *old.shape[1:])
            new[: self.count] = old[: self.count]
            setattr(self, name, new)
        cross = self.cross.new_zeros(k, want + 1)
        cross[:, : self.count] = self.cross[:, : self.count]
        self.cross = cross

    def state_dict(self) -> dict[str, Tensor]:
        """The held frames, on the CPU."""
        state = {name: getattr(self, name)[: self.count].cpu() for name in _ROWS}
        state["cross"] = self.cross[:, : self.count].cpu()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Hold the frames of state_dict() (at least one)."""
        n = state["slot"].shape[0]
        if self.capacity is not None and n > self.capacity:
            raise ValueError(f"bank holds {n} frames, more than its capacity {self.capacity}")
        self.count, self.low = 0, None
        self._reserve(n, state["low"][0], state["full"][0], state["cross"].shape[0])
        for name in _ROWS:
            getattr(self, name)[:n] = state[name].to(self.device)
        self.cross[:, :n] = state["cross"].to(self.device)
        self.count = n
