"""Flash Memory: a fixed-size memory of a video stream (CSM + DAM) with immutable snapshots.

One writer thread calls update() (and reset()/save()); any thread may call snapshot() and keep
the returned MemorySnapshot while the writer builds the next one. See docs/memory.md.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fvs_ros.common.cuda_graph import CaptureError
from fvs_ros.common.files import atomic_write

from . import csm, dam
from .bank import FeatureBank
from .csm import Absorption, Clusters
from .graph import SplitStep

log = logging.getLogger(__name__)

FORMAT = "fvs_ros.flash_memory"
FORMAT_VERSION = 1
DAM_ORDERS = ("weight", "time")
HEAD_ITERS = 1  # Lloyd iterations in a frame's head CUDA graph: after the warm start one converges (csm.py)


class MemoryFileError(Exception):
    """A memory file is missing, unreadable, corrupt or of another format version."""


@dataclass(frozen=True)
class MemoryConfig:
    csm_slots: int = 60  # K: CSM centroids
    dam_frames: int = 30  # D: frames whose full-resolution features DAM keeps
    kmeans_iters: int = 10  # Lloyd iterations per update, at most
    kmeans_tol: float = 1e-4  # stop when the centroids move less than this in total
    bank_capacity: int | None = 120  # frames retained for DAM; None keeps every frame (unbounded)
    dam_order: str = (
        "weight"  # DAM frames to the LLM heaviest cluster first (official, trained); "time": by slot
    )

    def __post_init__(self):
        if self.dam_order not in DAM_ORDERS:
            raise ValueError(f"MemoryConfig.dam_order must be one of {DAM_ORDERS}, got {self.dam_order!r}")
        if self.csm_slots < 1 or self.dam_frames < 0 or self.kmeans_iters < 1 or not self.kmeans_tol >= 0:
            raise ValueError(f"invalid memory config {self}")
        if self.bank_capacity is not None and self.bank_capacity < max(self.dam_frames, 1):
            raise ValueError(
                f"bank_capacity ({self.bank_capacity}) must be >= dam_frames ({self.dam_frames})"
            )


@dataclass(frozen=True)
class MemorySnapshot:
    """What the memory holds after one update. Never mutated after creation.

    Features live on the memory's device and are complete when the snapshot is published;
    the per-slot metadata are CPU tensors. Times are in slot units (slot index = arrival order,
    0-based); stamps in seconds of stream time.
    """

    csm_features: Tensor  # [K', Nl, C] float32 centroids, sorted by time
    csm_weights: Tensor  # [K'] int64, frames absorbed; sums to frames_seen
    csm_times: Tensor  # [K'] float64, weighted mean slot index, ascending
    csm_stamps: Tensor  # [K'] float64, weighted mean stamp
    dam_features: Tensor  # [D', Nf, C] full-resolution features of the retrieved frames
    dam_slots: Tensor  # [D'] int64, their slot indices, in the LLM's order (MemoryConfig.dam_order)
    dam_stamps: Tensor  # [D'] float64
    frames_seen: int
    first_stamp: float | None  # None while empty
    last_stamp: float | None
    version: int  # increases with every update/reset of the FlashMemory that made it
    full_hw: tuple[int, int] | None  # ViT patch grid (h, w) of a full-res slot, as given to update()
    # Where the memory came from (answer evidence, memory views); CPU tensors.
    # [K', 2] float64: stamps of each centroid's earliest and latest member
    csm_spans: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))
    # [K'] int64 / float64: slot index and stamp of the retained frame nearest to each centroid
    csm_nearest_slots: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    csm_nearest_stamps: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    # [n] int64: slot indices of the frames the bank retains (DAM picks from these), ascending
    bank_slots: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of this snapshot's tensors."""
        return sum(
            t.nbytes
            for t in (
                self.csm_features,
                self.csm_weights,
                self.csm_times,
                self.csm_stamps,
                self.dam_features,
                self.dam_slots,
                self.dam_stamps,
                self.csm_spans,
                self.csm_nearest_slots,
                self.csm_nearest_stamps,
                self.bank_slots,
            )
        )


def _empty_snapshot(version: int, device: torch.device) -> MemorySnapshot:
    none = torch.zeros(0, 0, 0, device=device)
    return MemorySnapshot(
        none,
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.float64),
        torch.zeros(0, dtype=torch.float64),
        none,
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.float64),
        0,
        None,
        None,
        version,
        None,
    )


class FlashMemory:
    """Fixed-size memory of a stream: CSM centroids + a bounded bank for DAM retrieval.

    update(low [B, Nl, C], full [B, Nf, C], stamps [B], full_hw) absorbs B frames, one after the other
    (a batch gives exactly the memory that B single-frame updates give), and publishes a new
    snapshot. Bad input raises ValueError and leaves the memory unchanged.

    cuda_graphs: on CUDA, once the bounded bank is full, replay each frame's update from CUDA
    graphs (identical results, a fraction of the launch overhead); False: always eager.
    """

    def __init__(
        self, config: MemoryConfig | None = None, device: str | torch.device = "cpu", cuda_graphs: bool = True
    ):
        self.config = config or MemoryConfig()
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._new_probe = _convergence_probe(self.device)
        self._use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_replays = 0  # frames absorbed by replaying the CUDA graphs (all time)
        self.graph_tail_replays = 0  # Lloyd iterations replayed after the head graph's (all time)
        self._version = 0
        self._clear()

    # ---- readers -------------------------------------------------------------------------
    def snapshot(self) -> MemorySnapshot:
        """The latest snapshot; safe from any thread, never changes after it is returned."""
        return self._snapshot

    @property
    def frames_seen(self) -> int:
        return self._frames_seen

    def nbytes(self) -> int:
        """Bytes held: writer state (centroids, feature bank) plus the published snapshot."""
        state = (
            0
            if self._clusters is None
            else self._reference.nbytes
            + sum(getattr(self._clusters, name).nbytes for name in Clusters.__dataclass_fields__)
        )
        return state + self._bank.nbytes() + self._snapshot.nbytes

    @staticmethod
    def full_nbytes(config: MemoryConfig, nl: int, nf: int, c: int, dtype: torch.dtype) -> int:
        """What nbytes() reaches once a bounded bank is full, for Nl / Nf tokens of C features per slot
        in `dtype` (the full-resolution features' dtype): computed before any frame arrives (the
        model's memory budget). The snapshot's small per-slot metadata are counted too, as in nbytes."""
        if config.bank_capacity is None:
            raise ValueError("an unbounded bank (bank_capacity None) grows with the stream: no full size")
        k, d, rows = config.csm_slots, nl * c, config.bank_capacity + 1  # + the bank's discard row
        f32, f64, i64 = 4, 8, 8
        clusters = d * f32 + k * d * f32 + k * k * f64 + 3 * k * f64 + 2 * k * f64  # reference + Clusters
        bank = rows * (d * f32 + f64 + nf * c * dtype.itemsize + i64 + f64) + k * rows * f64
        csm = k * (nl * c * f32 + i64 + f64 + f64 + 2 * f64 + i64 + f64)  # features, weights, times,
        # stamps, spans, nearest slots and stamps
        dam = config.dam_frames * (nf * c * dtype.itemsize + i64 + f64)
        return clusters + bank + csm + dam + config.bank_capacity * i64  # + bank_slots

    # ---- writer --------------------------------------------------------------------------
    def update(
        self,
        low: Tensor,
        full: Tensor,
        stamps: Tensor | Sequence[float],
        full_hw: tuple[int, int] | None = None,
    ) -> MemorySnapshot:
        """Absorb B frames: low-res [B, Nl, C] and full-res [B, Nf, C] ViT features (before the
        merger), stamps [B] in seconds (non-decreasing), full_hw = (h, w) the ViT patch grid of a
        full-res slot (h * w = Nf; kept for the snapshot's readers). Returns the new snapshot."""
        with self._lock:
            low, full, stamps, full_hw = self._checked(low, full, stamps, full_hw)
            self._absorb_all(low, full, stamps, full_hw)
            self._version += 1
            self._snapshot = self._publish()
            return self._snapshot

    def reset(self) -> None:
        """Forget everything (the version keeps increasing)."""
        with self._lock:
            self._clear()

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole memory to `path` (temp name, fsync, rename: a crash leaves any old file intact)."""
        state = self.state()
        atomic_write(Path(path), lambda f: torch.save(state, f))

    def state(self) -> dict[str, Any]:
        """Everything save() writes, as CPU copies: what later updates do cannot change it."""
        with self._lock:
            state = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": asdict(self.config),
                "frames_seen": self._frames_seen,
                "first_stamp": self._first_stamp,
                "last_stamp": self._last_stamp,
                "version": self._version,
                "shape": self._shape,
            }
            if self._clusters is not None:
                state["clusters"] = {
                    name: _cpu_copy(getattr(self._clusters, name)) for name in Clusters.__dataclass_fields__
                }
                state["reference"] = _cpu_copy(self._reference)
                state["bank"] = {k: _cpu_copy(v) for k, v in self._bank.state_dict().items()}
        return state

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", cuda_graphs: bool = True
    ) -> FlashMemory:
        """A memory restored from save(); raises MemoryFileError if it cannot be."""
        path = Path(path)
        if not path.is_file():
            raise MemoryFileError(f"no memory file at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MemoryFileError(f"{path} is not a readable memory file: {e}") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise MemoryFileError(f"{path} is not an fvs_ros memory file")
        if state.get("format_version") != FORMAT_VERSION:
            raise MemoryFileError(
                f"{path} has memory format version {state.get('format_version')}; "
                f"this fvs_ros reads version {FORMAT_VERSION}"
            )
        try:
            mem = cls(MemoryConfig(**state["config"]), device, cuda_graphs)
            mem._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            raise MemoryFileError(f"{path} is corrupt: {e!r}") from e
        return mem

    # ---- internals -----------------------------------------------------------------------
    def _clear(self) -> None:
        self._graphs: SplitStep | None = None  # captured for the buffers below; dropped with them
        self._clusters: Clusters | None = None
        self._absorption: Absorption | None = None  # the frame step's buffers
        self._full_in: Tensor | None = None  # [Nf, C] the graphs' full-res input (allocated at capture)
        self._reference: Tensor | None = (
            None  # [Nl*C] float32, the first frame: vectors are kept relative to it
        )
        self._bank = FeatureBank(self.config.bank_capacity, self.device)
        self._shape: dict[str, Any] | None = (
            None  # low_tokens, full_tokens, channels, full_dtype (name), full_hw
        )
        self._frames_seen = 0
        self._first_stamp: float | None = None
        self._last_stamp: float | None = None
        self._version += 1
        self._snapshot = _empty_snapshot(self._version, self.device)

    def _checked(
        self, low: Any, full: Any, stamps: Any, full_hw: Any
    ) -> tuple[Tensor, Tensor, np.ndarray, Any]:
        """Validated inputs on the memory's device, or ValueError (the memory is untouched)."""
        for name, x in (("low", low), ("full", full)):
            if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
                raise ValueError(
                    f"{name} features must be a floating-point tensor [B, tokens, C], got "
                    f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
                )
        b, nl, c = low.shape
        if b == 0 or full.shape[0] != b or full.shape[2] != c or nl == 0 or full.shape[1] == 0 or c == 0:
            raise ValueError(
                f"low {tuple(low.shape)} and full {tuple(full.shape)} must be [B, Nl, C] and "
                f"[B, Nf, C] with the same B >= 1 and C"
            )
        if self._shape is not None and (nl, full.shape[1], c) != (
            self._shape["low_tokens"],
            self._shape["full_tokens"],
            self._shape["channels"],
        ):
            raise ValueError(
                f"frame features changed shape: memory holds Nl={self._shape['low_tokens']}, "
                f"Nf={self._shape['full_tokens']}, C={self._shape['channels']}; got Nl={nl}, "
                f"Nf={full.shape[1]}, C={c}"
            )
        if full_hw is not None:
            full_hw = tuple(int(n) for n in full_hw)
            if len(full_hw) != 2 or full_hw[0] * full_hw[1] != full.shape[1]:
                raise ValueError(
                    f"full_hw {full_hw} must be the (h, w) grid of the {full.shape[1]} full-res tokens"
                )
            if self._shape is not None and self._shape["full_hw"] not in (None, list(full_hw)):
                raise ValueError(
                    f"full_hw changed: memory holds {tuple(self._shape['full_hw'])}, got {full_hw}"
                )
        try:
            stamps = np.asarray(torch.as_tensor(stamps, dtype=torch.float64).cpu(), dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"stamps must be {b} numbers: {e}") from e
        if stamps.shape != (b,) or not np.isfinite(stamps).all():
            raise ValueError(f"stamps must be {b} finite numbers, got {stamps}")
        previous = -math.inf if self._last_stamp is None else self._last_stamp
        if np.any(np.diff(stamps, prepend=previous) < 0):
            raise ValueError(
                f"stamps must not decrease (last stamp {self._last_stamp}, got {stamps}); "
                f"reset() the memory when the clock jumps back"
            )
        low = low.to(self.device)
        full = full.to(
            self.device, dtype=getattr(torch, self._shape["full_dtype"]) if self._shape else full.dtype
        )
        if not bool(torch.isfinite(low).all() & torch.isfinite(full).all()):
            raise ValueError("frame features contain NaN or Inf")
        return low, full, stamps, full_hw

    def _absorb_all(
        self, low: Tensor, full: Tensor, stamps: np.ndarray, full_hw: tuple[int, int] | None
    ) -> None:
        b, nl, c = low.shape
        frames = low.reshape(b, nl * c).float()
        if self._clusters is None:
            self._shape = {
                "low_tokens": nl,
                "full_tokens": full.shape[1],
                "channels": c,
                "full_dtype": str(full.dtype).removeprefix("torch."),
                "full_hw": None,
            }
            self._clusters = Clusters.empty(self.config.csm_slots, nl * c, self.device)
            self._absorption = Absorption.empty(self.config.csm_slots, nl * c, self.device)
            self._reference = frames[0].clone()
            self._first_stamp = float(stamps[0])
        if full_hw is not None:
            self._shape["full_hw"] = list(full_hw)
        slots = np.arange(self._frames_seen, self._frames_seen + b, dtype=np.float64)
        slot_stamps = torch.from_numpy(np.stack([slots, stamps - self._first_stamp], 1)).to(self.device)
        for i in range(b):  # frame by frame, with the same op shapes whatever B is: batches are exact
            self._absorb_frame(frames[i], full[i], slot_stamps[i])
        self._frames_seen += b
        self._last_stamp = float(stamps[-1])

    def _absorb_frame(self, low: Tensor, full: Tensor, slot_stamp: Tensor) -> None:
        """One frame: low [D] float32 raw low-res features, full [Nf, C] in the bank's dtype,
        slot_stamp [2] float64 (slot index, stamp relative to the first frame). Replayed from the
        CUDA graphs once the bounded bank is full (then every shape is fixed), else eagerly. The
        first frame that finds the bank full is captured."""
        ab = self._absorption
        torch.sub(low, self._reference, out=ab.frame)
        ab.slot_stamp.copy_(slot_stamp)
        if self._graphs is not None:
            self._full_in.copy_(full)
            self.graph_tail_replays += self._graphs.replay()
            self.graph_replays += 1
        elif self._use_graphs and self._bank.count == self._bank.capacity:
            self._graphs = self._capture(full)
        else:
            self._start(self.config.kmeans_iters, self._new_probe())
            self._finish(full)

    def _capture(self, full: Tensor) -> SplitStep | None:
        """The step captured for the frames that follow, in graphs around the Lloyd loop (graph.py):
        head = start + HEAD_ITERS iterations, tail = one iteration (replayed while not converged),
        finish. Capturing absorbs this frame. If a capture fails: a warning, and this memory stays
        eager (None)."""
        head = min(HEAD_ITERS, self.config.kmeans_iters)
        self._full_in = full.clone()
        try:
            return SplitStep(
                partial(self._start, head),
                partial(self._iterate, 1),
                self.config.kmeans_iters - head,
                partial(self._finish, self._full_in),
                self._absorption.done,
                self.device,
            )
        except CaptureError as e:
            log.warning("Flash Memory: CUDA graph capture failed, updating eagerly from now on: %s", e)
            self._use_graphs = False
            self._full_in = None
            return None

    # The frame step: the writer state (clusters, bank) updated in place from self._absorption (which
    # holds the frame). With the bank full every shape is fixed and there are no host reads, so the CUDA
    # graphs capture exactly these functions.
    def _start(self, iters: int, stop_early: Callable[[Tensor], bool] | None = None) -> None:
        """The frame's dot products, the Ward merge, then up to `iters` Lloyd iterations."""
        csm.start(self._absorption, self._clusters)
        self._iterate(iters, stop_early)

    def _iterate(self, iters: int, stop_early: Callable[[Tensor], bool] | None = None) -> None:
        """Up to `iters` more Lloyd iterations (none change anything once converged)."""
        csm.iterate(self._absorption, iters, self.config.kmeans_tol, stop_early)

    def _finish(self, full: Tensor) -> None:
        """The new centroids into the state and the frame (full [Nf, C] its full-res features)
        offered to the bank."""
        ab, clusters = self._absorption, self._clusters
        frame_dots = self._bank.dots(ab.frame)
        new = csm.finish(ab, clusters)
        slot, stamp = ab.slot_stamp
        self._bank.add(ab.frame, ab.frame_sq, frame_dots, ab.dots, full, slot.long(), stamp, new, ab.a)
        clusters.copy_(new)

    def _publish(self) -> MemorySnapshot:
        """The snapshot of the current state: live centroids by time, DAM picks. One device->host
        copy (all metadata) and one host->device copy (the DAM rows); the device gathers the
        centroids while the host picks the DAM frames."""
        clusters, bank, shape, n = self._clusters, self._bank, self._shape, self._bank.count
        by_time = torch.where(clusters.live, clusters.time, math.inf).argsort(stable=True)  # dead last
        meta = [
            clusters.mass,
            clusters.time,
            clusters.stamp,
            clusters.span.reshape(-1),
            by_time.double(),
            clusters.gram.diagonal(),
            bank.sq[:n],
            bank.slot[:n].double(),
            bank.stamp[:n],
            bank.cross[:, :n].reshape(-1),
        ]
        host = torch.cat(meta).to("cpu", non_blocking=True)  # one dtype, one kernel; slots < 2**53 are exact
        landed = _recorded_event(self.device)
        centers = clusters.centers.index_select(0, by_time).add_(self._reference)
        if landed is not None:
            landed.synchronize()
        ends = np.cumsum([t.numel() for t in meta]).tolist()
        mass, time, stamp, span, by_time, c_sq, f_sq, slot, bank_stamp, cross = (
            host.numpy()[a:b] for a, b in zip([0, *ends], ends, strict=False)
        )
        live = int(np.count_nonzero(mass > 0))
        order = by_time[:live].astype(np.int64)
        choosers = order[dam.official_order(mass[order])][: self.config.dam_frames]
        scale = c_sq[choosers, None] + f_sq[None, :]
        rows = dam.pick_frames(np.maximum(scale - 2 * cross.reshape(-1, n)[choosers], 0), scale, slot)
        if self.config.dam_order == "time" or self._frames_seen <= self.config.dam_frames:
            rows = rows[np.argsort(slot[rows], kind="stable")]  # official: all slots, in time order
        nearest = _nearest_frames(c_sq[order], f_sq, cross.reshape(-1, n)[order], slot)
        snap = MemorySnapshot(
            csm_features=centers[:live].view(live, shape["low_tokens"], shape["channels"]),
            csm_weights=torch.from_numpy(mass[order].astype(np.int64)),
            csm_times=torch.from_numpy(time[order]),
            csm_stamps=torch.from_numpy(stamp[order] + self._first_stamp),
            dam_features=bank.full.index_select(0, torch.from_numpy(rows).to(self.device)),
            dam_slots=torch.from_numpy(slot[rows].astype(np.int64)),
            dam_stamps=torch.from_numpy(bank_stamp[rows] + self._first_stamp),
            frames_seen=self._frames_seen,
            first_stamp=self._first_stamp,
            last_stamp=self._last_stamp,
            version=self._version,
            full_hw=None if shape["full_hw"] is None else tuple(shape["full_hw"]),
            csm_spans=torch.from_numpy(span.reshape(-1, 2)[order] + self._first_stamp),
            csm_nearest_slots=torch.from_numpy(slot[nearest].astype(np.int64)),
            csm_nearest_stamps=torch.from_numpy(bank_stamp[nearest] + self._first_stamp),
            bank_slots=torch.from_numpy(np.sort(slot).astype(np.int64)),
        )
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return snap

    def _restore(self, state: dict[str, Any]) -> None:
        self._frames_seen = int(state["frames_seen"])
        self._first_stamp, self._last_stamp = state["first_stamp"], state["last_stamp"]
        self._version = int(state["version"])
        if self._frames_seen == 0:
            self._snapshot = _empty_snapshot(self._version, self.device)
            return
        shape = dict(state["shape"])
        if not isinstance(getattr(torch, shape["full_dtype"], None), torch.dtype):
            raise ValueError(f"unknown dtype {shape['full_dtype']}")
        dim = shape["low_tokens"] * shape["channels"]
        clusters = dict(state["clusters"])
        if "span" not in clusters:  # files written before spans were kept: a span collapses to the mean
            clusters["span"] = clusters["stamp"][:, None].repeat(1, 2)
        saved = Clusters(**clusters)
        reference, bank, k = state["reference"].to(self.device), state["bank"], self.config.csm_slots
        if (
            saved.centers.shape != (k, dim)
            or saved.gram.shape != (k, k)
            or reference.shape != (dim,)
            or any(getattr(saved, name).shape != (k,) for name in ("mass", "time", "stamp"))
            or saved.span.shape != (k, 2)
            or int(saved.mass.sum()) != self._frames_seen
            or bank["low"].shape[1:] != (dim,)
            or bank["cross"].shape != (k, bank["low"].shape[0])
            or bank["full"].shape[1:] != (shape["full_tokens"], shape["channels"])
        ):
            raise ValueError("saved tensors do not match the saved config and counters")
        self._graphs, self._full_in = None, None  # the state tensors are replaced
        self._shape, self._clusters, self._reference = shape, Clusters.empty(k, dim, self.device), reference
        self._absorption = Absorption.empty(k, dim, self.device)
        self._clusters.copy_(saved)
        self._bank.load_state_dict(bank)
        self._snapshot = self._publish()


def _cpu_copy(x: Any) -> Any:
    """A CPU tensor that shares no storage with `x` (tensors only; anything else as it is)."""
    if not isinstance(x, Tensor):
        return x
    return x.detach().to("cpu", copy=True)


def _nearest_frames(c_sq: np.ndarray, f_sq: np.ndarray, cross: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Row of the retained frame nearest to each centroid ([k]); near-ties go to the most recent
    frame, as in DAM (a two-frame cluster's centroid is equidistant from both)."""
    scale = c_sq[:, None] + f_sq[None, :]
    d = np.maximum(scale - 2 * cross, 0)
    near = d <= d.min(1, keepdims=True) * (1 + dam.TIE_RTOL) + dam.TIE_NOISE * scale
    return np.argmax(np.where(near, slot[None, :], -1), axis=1)


def _recorded_event(device: torch.device) -> torch.cuda.Event | None:
    """On CUDA, an event recorded on the current stream (None on the CPU, where work is done when queued)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _convergence_probe(device: torch.device) -> Callable[[], Callable[[Tensor], bool]]:
    """Factory of stop_early(done) for one k-means run: reads the device flag without stalling.

    On CUDA each call queues an asynchronous copy of `done` to pinned host memory and answers
    from the previous call's copy if it has landed (else: keep iterating; iterations after
    convergence are frozen no-ops costing a little GPU time). On the CPU reading it is free.
    """
    if device.type != "cuda":
        return lambda: bool
    host = torch.zeros((), dtype=torch.bool).pin_memory()
    landed = torch.cuda.Event()

    def new_probe() -> Callable[[Tensor], bool]:
        queued = False

        def stop_early(done: Tensor) -> bool:
            nonlocal queued
            if queued and landed.query() and bool(host):
                return True
            host.copy_(done, non_blocking=True)
            landed.record()
            queued = True
            return False

        return stop_early

    return new_probe
