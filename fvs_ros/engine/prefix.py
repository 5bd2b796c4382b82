"""Prefix cache: the KV cache of [system prompt + memory], kept warm by a builder thread.

The engine tells it when memory changed (memory_changed), when a frame batch or an answer has
the GPU (gpu_busy), and asks it for a prefix no older than its bounds (get). Everything the
builder decides is guarded by one condition variable (`_cv`); the engine's own locks are never
taken here. Design, bounds and measurements: docs/engine.md ("Prefix cache").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Generator, Optional, Protocol

import torch

from fvs_ros.engine.scheduler import PREFILL, Priority, staleness
from fvs_ros.memory import MemorySnapshot

log = logging.getLogger(__name__)

# Between chunks the builder pauses while a frame batch or an answer has the GPU, at most this
# long each time, and at most yield_budget_s in all per rebuild: after that it shares the GPU (its
# stream's lower priority still puts frame and decode kernels first), so the prefix keeps
# advancing under back-to-back questions or a frame burst (no starvation).
_YIELD_S = 0.1


class MemoryPrefix(Protocol):
    """What the engine needs of a model's prefix object (fvs_ros.model.video_lm.MemoryPrefix)."""

    num_tokens: int
    next_position: int
    snapshot_version: int


class PrefixModel(Protocol):
    """The model seam of the prefix cache (VideoLM.prefill_steps)."""

    def prefill_steps(
        self, snapshot: MemorySnapshot, system_prompt: str, chunk_tokens: Optional[int] = None
    ) -> Generator[None, None, MemoryPrefix]: ...


@dataclass(frozen=True, eq=False)
class Published:
    """The memory snapshot readers use, tagged with the stream epoch (bumped by reset/load)."""

    snapshot: MemorySnapshot
    epoch: int
    first_stamp: Optional[float] = None  # stamp of the first frame of the memory's first slot
    updated_at: float = field(default_factory=time.perf_counter)  # when it was published


@dataclass(frozen=True)
class Prefix:
    """A built prefix and the memory it was built from."""

    source: Published
    prefix: MemoryPrefix
    built_at: float  # time.monotonic() when it was swapped in
    build_s: float  # how long the build took (pauses included)


class PrefixCache:
    """Builds prefixes of the newest memory on its own thread and hands them to answers.

    latest() returns the engine's newest Published memory; stream() is the context a worker
    thread runs its GPU work in; sync() waits for this thread's GPU work; on_error(where, exc)
    records a build failure.
    """

    def __init__(
        self,
        lm: PrefixModel,
        latest: Callable[[], Published],
        *,
        system_prompt: str,
        refresh_s: float,
        max_lag_s: float,
        chunk_tokens: int,
        yield_budget_s: float = float("inf"),
        stream: Callable[[], ContextManager],
        sync: Callable[[], None],
        on_error: Callable[[str, BaseException], None],
        on_built: Callable[[], None] = lambda: None,
        gpu: Optional[Callable[[Priority, float, str], ContextManager]] = None,
    ):
        self.lm, self._latest = lm, latest
        self.system_prompt = system_prompt
        self.refresh_s, self.max_lag_s, self.chunk_tokens = refresh_s, max_lag_s, chunk_tokens
        self.yield_budget_s = yield_budget_s
        self._stream, self._sync, self._on_error = stream, sync, on_error
        self._on_built = on_built  # called (outside _cv) after a new prefix is swapped in
        # gpu(priority, staleness, lane): the host's gate around each chunk (EngineHost.gpu)
        self._gpu = gpu or (lambda priority, stale, lane: contextlib.nullcontext())
        self._cv = threading.Condition()
        self._prefix: Optional[Prefix] = None  # written by the builder thread, under _cv
        self._building: Optional[Published] = None  # the memory being prefilled (set with the decision)
        self._started_at = -float("inf")  # time.monotonic() when the last build started
        self._wanted = False  # a question wants a prefix: the next build starts at once
        self._waiting: Optional[Published] = None  # the memory a question waits for (no pausing then)
        self._answering = self._encoding = 0  # answers / frame batches on the GPU now
        self._attempts = 0  # builds finished or failed
        self._error: Optional[tuple[int, BaseException]] = None  # (attempt, error) of the last build
        self._failed: Optional[Published] = None  # no background retry until the memory changes
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.last_build_s: Optional[float] = None

    # ----------------------------------------------------------------- engine -> cache

    def start(self, thread: Optional[Callable[[str, Callable[[], None]], threading.Thread]] = None):
        """Start the builder thread; `thread(name, loop)` makes it (the engine's WorkerWatch)."""
        if thread is None:
            self._thread = threading.Thread(target=self._loop, name="fvs-prefix-builder", daemon=True)
        else:
            self._thread = thread("prefix builder", self._loop)
        self._thread.start()

    def stop(self):
        """Stop the builder (a build under way ends at its next chunk) and wake every waiter."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def wake(self):
        """Something a waiter or the builder looks at changed (memory, a request, a cancellation)."""
        with self._cv:
            self._cv.notify_all()

    memory_changed = wake

    @contextlib.contextmanager
    def gpu_busy(self, what: str):
        """A frame batch (what='frames') or an answer ('answer') has the GPU meanwhile."""
        attr = "_encoding" if what == "frames" else "_answering"
        with self._cv:
            setattr(self, attr, getattr(self, attr) + 1)
        try:
            yield
        finally:
            with self._cv:
                setattr(self, attr, getattr(self, attr) - 1)
                self._cv.notify_all()

    @property
    def current(self) -> Optional[Prefix]:
        return self._prefix

    def get(self, pub: Published, abandon: Callable[[], bool]) -> Optional[tuple[Prefix, bool]]:
        """A prefix for a question on memory `pub`: (prefix, True) when one already built serves it,
        (prefix, False) after waiting for the builder, None if abandon() became true or the cache
        stopped while waiting (callers wake() the cache when abandon() may have changed).

        Served at once: a prefix of this stream built from `pub` or newer, or one at most
        max_lag_s of stream time older, or (a rebuild under way lands soon) 2 x max_lag_s older.
        Otherwise the question waits: the builder starts at once, does not pause, and drops a
        build that would not serve this question. So no answer rests on a prefix more than
        2 x max_lag_s behind the memory of its question (a burst of frames cannot leave answers
        minutes behind). A failed build raises its error to the waiter.
        """
        with self._cv:
            p = self._usable(pub)
            if p is not None:
                return p, True
            p = self._prefix
            if (
                self._building is not None
                and p is not None
                and self._serves(p.source, pub, 2 * self.max_lag_s)
            ):
                self._wanted = True  # and the next rebuild follows this one at once
                return p, True
            attempts = self._attempts
            self._waiting, self._wanted = pub, True
            self._cv.notify_all()
            try:
                while True:
                    p = self._usable(pub)
                    if p is not None:
                        return p, False
                    if self._stopping or abandon():
                        return None
                    if self._error is not None and self._error[0] > attempts:
                        raise self._error[1]
                    self._wanted = True
                    self._cv.wait()
            finally:
                self._waiting = None

    def _usable(self, pub: Published) -> Optional[Prefix]:
        p = self._prefix
        return p if p is not None and self._serves(p.source, pub, self.max_lag_s) else None

    def _serves(self, source: Published, pub: Published, bound: float) -> bool:
        """A prefix built from `source` may answer a question on `pub`: same stream, and as new or at
        most `bound` stream seconds older (with max_lag_s > 0)."""
        if source.epoch != pub.epoch:
            return False
        if source.snapshot.version >= pub.snapshot.version:
            return True
        return self.max_lag_s > 0 and pub.snapshot.last_stamp - source.snapshot.last_stamp <= bound

    # ----------------------------------------------------------------- builder

    def _loop(self):
        """On a low-priority stream of its own: frames and answers go first on the GPU."""
        with torch.inference_mode(), self._stream():
            while True:
                with self._cv:
                    while not self._stopping and (wait := self._due()) != 0:
                        self._cv.wait(wait)
                    if self._stopping:
                        return
                    pub = self._latest()
                    # The decision and the mark that a build runs are one step under _cv: a question
                    # in between would otherwise wait for the whole build.
                    self._building, self._wanted = pub, False
                    self._started_at = time.monotonic()
                self._build(pub)

    def _due(self) -> Optional[float]:
        """Seconds until a rebuild is due (0: now; None: not needed)."""
        pub = self._latest()
        if pub.snapshot.frames_seen == 0:
            return None
        p = self._prefix
        if (
            p is not None
            and p.source.epoch == pub.epoch
            and p.source.snapshot.version >= pub.snapshot.version
        ):
            return None  # current
        if self._wanted or p is None or p.source.epoch != pub.epoch:
            return 0.0
        if self._failed is pub:
            return None
        if (
            self.max_lag_s > 0
            and pub.snapshot.last_stamp - p.source.snapshot.last_stamp >= self.max_lag_s - p.build_s
        ):
            return 0.0  # a rebuild started now lands about when the prefix would pass the bound
        return max(0.0, self._started_at + self.refresh_s - time.monotonic())  # start to start

    def _build(self, pub: Published):
        """Prefill the memory of `pub`, then swap it in; the old prefix serves answers until then."""
        t0 = time.perf_counter()
        try:
            prefix, error = self._prefill(pub), None
        except Exception as e:  # noqa: BLE001 - a failed build must not kill the builder
            prefix, error = None, e
            self._on_error("prefix refresh", e)
        with self._cv:
            self._building = None
            if prefix is None and error is None:  # stopping, or dropped for a newer memory
                self._cv.notify_all()
                return
            self._attempts += 1
            if error is not None:
                self._failed, self._error = pub, (self._attempts, error)
            else:
                self.last_build_s = time.perf_counter() - t0
                self._prefix = Prefix(pub, prefix, time.monotonic(), self.last_build_s)
                self._error = None
            self._cv.notify_all()
        if prefix is not None:
            self._on_built()

    def _prefill(self, pub: Published) -> Optional[MemoryPrefix]:
        """The model's prefix of `pub`, one chunk at a time; None if stopped or obsolete meanwhile."""
        steps = self.lm.prefill_steps(pub.snapshot, self.system_prompt, self.chunk_tokens or None)
        budget = self.yield_budget_s
        while True:
            with self._gpu(*self._job_class(pub), PREFILL):  # one chunk is one GPU job (host.py)
                try:
                    next(steps)
                except StopIteration as done:
                    self._sync()
                    return done.value
                self._sync()  # one chunk at a time: a short GPU queue, and the GIL free while it runs
            with self._cv:  # frames and answers share the GPU with at most one chunk
                t = time.monotonic()
                self._cv.wait_for(
                    lambda: (
                        self._stopping or self._waiting is not None or not (self._answering or self._encoding)
                    ),
                    min(_YIELD_S, budget),
                )
                budget = max(0.0, budget - (time.monotonic() - t))
                if self._stopping or self._obsolete(pub):
                    return None

    def _job_class(self, pub: Published) -> tuple[Priority, float]:
        """The GPU job class of the next chunk of a build of `pub`: a question's when one waits for
        it, else a background rebuild, as stale as the prefix in service is behind `pub`."""
        if self._waiting is not None:
            return Priority.QUESTION, 0.0
        p = self._prefix
        if p is None or p.source.epoch != pub.epoch:
            return Priority.REBUILD, float("inf")
        lag = pub.snapshot.last_stamp - p.source.snapshot.last_stamp
        return Priority.REBUILD, staleness(float(lag), self.max_lag_s)

    def _obsolete(self, pub: Published) -> bool:
        """A reset/load made `pub` another stream's, or a question waits that its prefix would not serve."""
        w = self._waiting
        if self._latest().epoch != pub.epoch:
            return True
        return w is not None and not self._serves(pub, w, self.max_lag_s)
