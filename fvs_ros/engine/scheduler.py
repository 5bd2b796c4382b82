"""Which GPU job runs next, for every camera stream of one model: pure decisions, no torch.

The host (host.py) submits a Job for each piece of GPU work a stream's thread wants to run (a ViT
batch and its memory update, one prefix-build chunk, an answer, a watch evaluation, a summary),
asks `schedule()` which waiting jobs may start now, runs them, and reports them done with
`finish()`. Nothing here touches torch or threads, so the rules are unit-tested with fake
streams and a fake clock (test/engine/test_scheduler.py).

Lanes: three kinds of work share the GPU side by side, as the one-camera engine's three threads
always did (on CUDA streams of different priority): VISION (ViT batches and memory updates),
PREFILL (prefix-build chunks) and DECODE (answers, watch evaluations, summaries). Each lane runs
one job at a time, except that a question (or a build chunk a question waits for) never waits
for background work on its lane (a watch evaluation, a summary, a background build chunk): it
starts beside it.

Priorities within a lane, highest first (Priority): a question, and the prefix build a question
waits for; frame batches and memory updates; watch evaluations on a new prefix; background prefix
builds, stalest first relative to max_prefix_lag_s; summaries. Aging: a job that has waited
`aging_s` moves up one class per `aging_s`, so nothing starves. Ties: the oldest submission.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Optional


class Priority(IntEnum):
    """Job classes, highest first (a lower value is served first)."""

    QUESTION = 0  # a question's prefill and decode, and a prefix build a question waits for
    FRAMES = 1  # a ViT batch and the memory update it feeds
    WATCH = 2  # the watched conditions on a new prefix
    REBUILD = 3  # a background prefix-build chunk
    SUMMARY = 4  # a periodic scene summary


VISION, PREFILL, DECODE = "vision", "prefill", "decode"
_LANE = {Priority.FRAMES: VISION, Priority.REBUILD: PREFILL}
# Jobs a question starts beside on its lane instead of waiting for them.
_BACKGROUND = frozenset({Priority.WATCH, Priority.REBUILD, Priority.SUMMARY})


def staleness(lag_s: Optional[float], max_lag_s: float) -> float:
    """A prefix's lag behind its memory in units of max_prefix_lag_s (Job.staleness): 0 when it is
    not behind, inf when it is behind and the bound is 0."""
    if lag_s is None or lag_s <= 0:
        return 0.0
    return math.inf if max_lag_s <= 0 else lag_s / max_lag_s


def lane_of(priority: Priority) -> str:
    """The lane a job of this class runs on unless its submitter names one (a prefix-build chunk a
    question waits for: QUESTION on PREFILL)."""
    return _LANE.get(priority, DECODE)


@dataclass(eq=False)
class Job:
    """One piece of GPU work of one stream, as the scheduler sees it.

    staleness (REBUILD only): how far the stream's prefix lags its newest memory, in units of its
    max_prefix_lag_s (lag / max_prefix_lag_s; inf when the bound is 0 and the prefix is behind)."""

    stream: str
    priority: Priority
    lane: str  # VISION, PREFILL or DECODE
    submitted: float  # scheduler clock at submit()
    staleness: float = 0.0
    seq: int = field(default=0, compare=False)


class Scheduler:
    """Waiting and running jobs; schedule() says which waiting jobs start now.

    clock: seconds, monotonic (time.monotonic by default; tests pass a fake). aging_s: a waiting job
    gains one class per this many seconds (inf: no aging)."""

    def __init__(self, clock: Callable[[], float], aging_s: float = 1.0):
        if not aging_s > 0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        self.clock, self.aging_s = clock, aging_s
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self._seq = itertools.count()

    def submit(
        self, stream: str, priority: Priority, staleness: float = 0.0, lane: Optional[str] = None
    ) -> Job:
        """Queue a job (on lane_of(priority) unless `lane` is given); it runs once schedule() returns it."""
        priority = Priority(priority)
        lane = lane_of(priority) if lane is None else lane
        if lane not in (VISION, PREFILL, DECODE):
            raise ValueError(f"unknown lane {lane!r}")
        job = Job(stream, priority, lane, self.clock(), float(staleness), next(self._seq))
        self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Withdraw a job that has not started (its thread gave up waiting)."""
        if job in self.waiting:
            self.waiting.remove(job)

    def finish(self, job: Job) -> None:
        """A running job is done: its lane is free for the next."""
        self.running.remove(job)

    def effective_class(self, job: Job, now: Optional[float] = None) -> float:
        """The job's class after aging (never better than QUESTION's)."""
        now = self.clock() if now is None else now
        if math.isinf(self.aging_s):
            return float(job.priority)
        return max(float(Priority.QUESTION), job.priority - (now - job.submitted) // self.aging_s)

    def order_key(self, job: Job, now: float) -> tuple:
        """Sort key of a waiting job: class after aging, then (background rebuilds) the stalest
        first, then the oldest."""
        staleness = -job.staleness if job.priority == Priority.REBUILD else 0.0
        return (self.effective_class(job, now), staleness, job.submitted, job.seq)

    def schedule(self) -> list[Job]:
        """Start what may start now: per lane, the best waiting job while the lane is free; a
        question also beside background language work. Returns the jobs started (now running)."""
        now = self.clock()
        started = []
        for job in sorted(self.waiting, key=lambda j: self.order_key(j, now)):
            if self._may_start(job):
                self.waiting.remove(job)
                self.running.append(job)
                started.append(job)
        return started

    def _may_start(self, job: Job) -> bool:
        """schedule() walks the waiting jobs best first, so a free lane goes to its best job; after
        that only a question may join it, and only beside background work."""
        busy = [r for r in self.running if r.lane == job.lane]
        if not busy:
            return True
        return job.priority == Priority.QUESTION and all(r.priority in _BACKGROUND for r in busy)
