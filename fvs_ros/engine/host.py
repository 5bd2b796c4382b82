"""One model, many camera streams: the host owns the model and admits every stream's GPU work.

A StreamEngine is one camera (its Flash Memory, sampler, prefix, thumbnails, watcher, stats and
persistence); the host holds the VideoLM they share (loaded and warmed up once) and the GPU
gate: every piece of GPU work of every stream (a ViT batch and memory update, a prefix-build
chunk, an answer, a watch evaluation, a summary) runs inside `host.gpu(...)`, which waits until
the Scheduler (scheduler.py, pure decisions) starts it. One camera alone: `StreamEngine(lm)` /
`open_engine` make a host of their own. Design: docs/engine.md ("Several cameras").
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from fvs_ros.engine.scheduler import Job, Priority, Scheduler

if TYPE_CHECKING:
    from fvs_ros.engine.stream_engine import StreamEngine, VideoModel


class EngineHost:
    """The shared model and the GPU gate of the streams opened on it (thread-safe).

    aging_s: a GPU job waiting this long moves up one priority class (Scheduler)."""

    def __init__(
        self, lm: "VideoModel", *, aging_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        self.lm = lm
        self.device = torch.device(getattr(lm, "device", "cpu"))
        self._scheduler = Scheduler(clock, aging_s)
        self._cv = threading.Condition()
        self._streams: dict[str, "StreamEngine"] = {}
        self._warmed: set[tuple] = set()
        self._warm_lock = threading.Lock()

    # ----------------------------------------------------------------- streams

    def open_stream(self, name: str, *args, **kwargs) -> "StreamEngine":
        """A new (not started) stream named `name` on this host's model; arguments as StreamEngine's
        after `lm`. ValueError if the name is taken."""
        from fvs_ros.engine.stream_engine import StreamEngine

        return StreamEngine(self.lm, *args, host=self, name=name, **kwargs)

    def register(self, name: str, stream: "StreamEngine") -> None:
        """Called by StreamEngine.__init__: names are unique per host."""
        with self._cv:
            if name in self._streams:
                raise ValueError(f"a stream named {name!r} is already open on this model")
            self._streams[name] = stream

    def unregister(self, name: str, stream: "StreamEngine") -> None:
        """Called by StreamEngine.shutdown: the name may be opened again."""
        with self._cv:
            if self._streams.get(name) is stream:
                del self._streams[name]

    @property
    def streams(self) -> dict[str, "StreamEngine"]:
        """The streams opened on this host, by name (a copy)."""
        with self._cv:
            return dict(self._streams)

    def shutdown(self) -> None:
        """Shut every stream down (each is idempotent)."""
        for stream in self.streams.values():
            stream.shutdown()

    def ask_several(self, streams, question: str, **kwargs):
        """A question about several of this host's streams in one prompt (several.ask_several)."""
        from fvs_ros.engine.several import ask_several

        return ask_several(self, streams, question, **kwargs)

    def warm_up(self, csm_slots: int, dam_frames: int, max_new_tokens: int, frames_per_slot: int) -> None:
        """The model's warm_up, once per memory layout whatever the number of streams using it."""
        key = (csm_slots, dam_frames, max_new_tokens, frames_per_slot)
        with self._warm_lock:
            if key in self._warmed:
                return
            self.lm.warm_up(csm_slots, dam_frames, max_new_tokens, frames_per_slot=frames_per_slot)
            self._warmed.add(key)

    # ----------------------------------------------------------------- GPU gate

    @contextlib.contextmanager
    def gpu(
        self, stream: str, priority: Priority, staleness: float = 0.0, lane: Optional[str] = None
    ) -> Iterator[Job]:
        """Run the body as one GPU job of `stream` (Scheduler.submit's arguments): waits until the
        scheduler starts it, and frees its lane afterwards. Never nest (a job waiting inside another
        could wait for itself)."""
        with self._cv:
            job = self._scheduler.submit(stream, priority, staleness, lane)
            self._dispatch()
            while job in self._scheduler.waiting:
                self._cv.wait()
        try:
            yield job
        finally:
            with self._cv:
                self._scheduler.finish(job)
                self._dispatch()

    def _dispatch(self) -> None:
        if self._scheduler.schedule():
            self._cv.notify_all()

    def gpu_jobs(self) -> tuple[list[Job], list[Job]]:
        """(waiting, running) jobs now, copies (diagnostics, tests)."""
        with self._cv:
            return list(self._scheduler.waiting), list(self._scheduler.running)


def open_host(
    model_source, *, device="auto", dtype="auto", weights: str = "bf16", budget=None, aging_s: float = 1.0
) -> EngineHost:
    """Load a checkpoint once (load_model; raises ModelLoadError, BudgetExceeded) for streams opened
    with open_stream(). budget: load_model's BudgetCheck (stream_engine.budget_check), which
    estimates the model and one stream: each further camera's memory and prefix come on top."""
    from fvs_ros.model import load_model

    lm = load_model(model_source, dtype=dtype, device=device, weights=weights, budget=budget)
    return EngineHost(lm, aging_s=aging_s)
