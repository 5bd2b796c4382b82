"""Streaming engine: frame intake, requests and their workers around one VideoLM and one FlashMemory.

Three threads: the frame worker (ViT + memory update), the LLM worker (answers, summaries) and
the prefix builder of the PrefixCache (fvs_ros/engine/prefix.py), which keeps the KV prefix of
[system prompt + memory] warm. No ROS here: the node, the video CLI, the bag evaluation and the
tests all drive this class. Design and threading are described in docs/engine.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from fvs_ros.engine.clock import STAMP_LIMIT_S, Placement, StreamClock, legacy_state
from fvs_ros.engine.grounding import EvidenceItem, evidence_items
from fvs_ros.engine.host import EngineHost
from fvs_ros.engine.memory_view import MemoryView, render_memory_view
from fvs_ros.engine.persistence import SavedStateError, read_saved, write_saved
from fvs_ros.engine.prefix import MemoryPrefix, Prefix, PrefixCache, PrefixModel, Published
from fvs_ros.engine.scheduler import Priority
from fvs_ros.engine.thumbnails import ThumbnailStore, thumbnail
from fvs_ros.engine.watch import Watcher, WatchError, WatchResult, WatchRunner
from fvs_ros.engine.workers import WorkerWatch
from fvs_ros.memory import FlashMemory, MemoryConfig, MemoryFileError, MemorySnapshot
from fvs_ros.model.preprocess import resize_frames
from fvs_ros.model.prompt import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger(__name__)

TokenCallback = Callable[[str], None]

_SAVE_FORMAT = 2  # engine.json: 2 names its memory file (fvs_ros.engine.persistence); 1: memory.pt beside it
_QUESTION, _SUMMARY = 0, 1  # request priorities: lower is served first
# Three workers share the GIL. One waking from a GPU wait (a decode step, a ViT batch) takes it back
# within this time, instead of CPython's default 5 ms, while another launches a prefill chunk.
_GIL_SWITCH_S = 0.001


class EngineError(RuntimeError):
    """The engine could not serve a request (not running, shut down, model error)."""


class FrameError(ValueError):
    """A frame was rejected (type, dtype, shape, size or stamp); the engine keeps working."""


class QuestionError(ValueError):
    """A question or its limits are invalid; nothing was queued."""


class AnswerTimeout(EngineError, TimeoutError):
    """No answer within the timeout; the request was cancelled and the worker moved on.

    `partial` is the text generated until then ('' if generation had not started) and
    `pieces` the number of text pieces it came in (one per token, except that a character split
    across tokens arrives with its last token)."""

    def __init__(self, message: str, partial: str = "", pieces: int = 0):
        super().__init__(message)
        self.partial, self.pieces = partial, pieces


class AnswerCancelled(EngineError):
    """The asker cancelled the request (ask(cancel=...)); generation stopped at the next token.

    `partial`: the answer as far as it was generated (text, num_tokens: the pieces streamed to
    on_token so far, and the memory it was computed from), None if it had not started."""

    def __init__(self, message: str = "cancelled", partial: Optional["Answer"] = None):
        super().__init__(message)
        self.partial = partial


class _Cancelled(Exception):
    """Raised inside the token callback to stop a generation nobody waits for any more."""


@dataclass
class EngineConfig:
    """Engine settings (memory settings live in MemoryConfig, model ones in load_model)."""

    sample_fps: float = 1.0  # frames per second of stream time that enter memory; <= 0: every frame
    # Sampled frames per memory slot: 2 = two consecutive sampled frames in one Qwen2-VL temporal
    # patch, the layout the checkpoint was trained with; 1 = each frame alone (filling both halves).
    frames_per_slot: int = 2
    queue_size: int = 32  # sampled frames waiting for the ViT, whole slots; the oldest slot is dropped
    max_batch: int = 16  # frames encoded per ViT call (whatever is queued, whole slots, at least one)
    max_frame_side: int = 8192  # larger frames are rejected (FrameError)
    # Smaller sides are rejected (FrameError): below one merged ViT patch (28 px) a frame holds no
    # picture, only a blur the model's resize would spread over its whole input.
    min_frame_side: int = 28
    # How far a frame's stamp may run ahead of its source clock's previous frame beyond the time it
    # took to arrive, and still continue that clock (fvs_ros/engine/clock.py).
    stamp_slack_s: float = 1.0
    max_question_chars: int = 2000
    max_new_tokens: int = 128  # default answer length
    max_new_tokens_limit: int = 1024  # largest max_new_tokens a caller may ask for
    answer_timeout_s: float = 30.0  # default ask() timeout
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    summary_prompt: str = "Describe briefly what is happening in the video."
    summary_max_new_tokens: int = 64
    summary_period_s: float = 0.0  # wall seconds between automatic summaries (to on_summary); 0: off
    prefix_cache: bool = True  # False: every answer prefills [system + memory + question] from scratch
    prefix_refresh_s: float = 0.5  # background prefix rebuild at most this often (wall seconds)
    max_prefix_lag_s: float = 0.0  # stream time a question's prefix may lag the newest memory (0: exact)
    prefill_chunk_tokens: int = 1024  # background rebuilds run in chunks of this many tokens; 0: one pass
    # A rebuild pauses between chunks while frames or an answer have the GPU, for at most this long in
    # all; then it shares the GPU, so it lands within its own time plus this (inf: pauses unbounded).
    prefix_yield_budget_s: float = 0.2
    no_video_answer: str = "No video frames have been received yet, so I cannot answer about the video."
    evidence_frames: int = 3  # evidence items per answer and per watch event (grounding.py); 0: none
    thumbnail_side: int = 160  # longest side (px) of the thumbnails kept for retained frames; 0: none

    def __post_init__(self):
        for name in (
            "queue_size",
            "max_batch",
            "max_frame_side",
            "min_frame_side",
            "max_question_chars",
            "max_new_tokens",
            "max_new_tokens_limit",
            "summary_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.answer_timeout_s > 0:
            raise ValueError(f"EngineConfig.answer_timeout_s must be > 0, got {self.answer_timeout_s}")
        if self.evidence_frames < 0:
            raise ValueError(f"EngineConfig.evidence_frames must be >= 0, got {self.evidence_frames}")
        if self.thumbnail_side != 0 and self.thumbnail_side < 8:
            raise ValueError(f"EngineConfig.thumbnail_side must be 0 or >= 8, got {self.thumbnail_side}")
        for name in (
            "summary_period_s",
            "prefix_refresh_s",
            "max_prefix_lag_s",
            "prefill_chunk_tokens",
            "prefix_yield_budget_s",
            "stamp_slack_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("EngineConfig.max_new_tokens exceeds max_new_tokens_limit")
        if self.frames_per_slot not in (1, 2):
            raise ValueError(f"EngineConfig.frames_per_slot must be 1 or 2, got {self.frames_per_slot}")


@dataclass(frozen=True)
class Answer:
    """One answer and the part of the stream it was computed from."""

    text: str
    frames_seen: int  # frames the memory had absorbed (whole stream so far; whole slots only)
    frames_in_memory: int  # memory slots in use (CSM entries; <= MemoryConfig.csm_slots)
    first_stamp: Optional[float]  # stream time of the first frame seen (None: no video)
    last_stamp: Optional[float]  # stream time of the newest frame the answer saw (its slot's last frame)
    ttft_s: float  # from the ask() call to the first token (queueing and prefill included)
    total_s: float  # from the ask() call to the last token
    num_tokens: int
    from_cache: bool = False  # True when a prefix built before the question was used
    frames_per_slot: int = 2  # the slot layout that ran (EngineConfig.frames_per_slot)
    # Stamp of the newest frame the engine had received when the question arrived minus the
    # newest stamp in the memory the answer used (>= 0; None: memory empty). How old the answer's
    # view of the stream is: sampling, encoding, prefix rebuild and waiting all count.
    memory_lag_s: Optional[float] = None
    evidence: tuple[EvidenceItem, ...] = ()  # the memory blocks the answer attended to most (grounding.py)
    memory_attention: float = 0.0  # fraction of the answer's attention on memory tokens (with evidence)
    evidence_s: float = 0.0  # time spent measuring the evidence, after the last token


@dataclass(frozen=True)
class EngineStats:
    """Counters and latest timings (frame counters restart on reset())."""

    running: bool
    frames_in: int  # valid frames offered to add_frame
    frames_rejected: int  # FrameError
    frames_skipped: int  # not picked by the memory sampling rate (cost nothing)
    frames_dropped: int  # picked, then pushed out of the full queue (whole slots)
    frames_into_memory: int  # encoded and added to memory
    queue_depth: int  # slots waiting for the ViT
    frame_size: Optional[tuple[int, int]]  # (H, W) ViT input size every frame is resized to (see add_frame)
    frame_size_changes: int  # frames whose size differed from the previous frame's
    # Frames given to add_frame whose own model size differs from the memory's input size (the
    # memory holds one until reset; sampled ones are resized to it); frame_size_note names them.
    frame_size_mismatches: int
    stamp_jumps: int  # frames that did not continue their clock (went back, or left behind): clock.py
    memory_version: int
    frames_seen: int  # frames in the current memory snapshot (its slots x frames_per_slot)
    last_update_time: Optional[float]  # time.time() of the last memory update
    last_update_s: Optional[float]  # encode + memory update time of the last batch
    last_batch_size: int
    prefix_current: bool  # the cached prefix was built from the newest snapshot
    last_prefill_s: Optional[float]
    last_ttft_s: Optional[float]
    last_answer_s: Optional[float]
    questions_answered: int
    questions_failed: int
    questions_timed_out: int
    summaries: int
    watch_evaluations: int  # evaluations of the watched conditions (one per new memory prefix)
    last_watch_s: Optional[float]  # time of the latest (all conditions in one batched prefill)
    errors: int  # caught in the workers (model errors, CUDA OOM, ...)
    last_error: Optional[str]
    device_memory_bytes: Optional[int]  # torch.cuda.memory_allocated on CUDA, else None
    frame_size_note: Optional[str] = None
    stamp_note: Optional[str] = None  # what the latest stamp jump was (stamp_jumps)
    # A worker thread that died ('the LLM worker stopped: ...'); the engine then refuses questions
    # with this reason and `running` is False. None while every worker runs.
    worker_failure: Optional[str] = None


@dataclass
class _Counters:
    frames_in: int = 0
    frames_rejected: int = 0
    frames_skipped: int = 0
    frames_dropped: int = 0
    frames_into_memory: int = 0
    frame_size_changes: int = 0
    frame_size_mismatches: int = 0
    stamp_jumps: int = 0
    frame_size_note: Optional[str] = None
    stamp_note: Optional[str] = None
    last_update_time: Optional[float] = None
    last_update_s: Optional[float] = None
    last_batch_size: int = 0
    last_ttft_s: Optional[float] = None
    last_answer_s: Optional[float] = None
    questions_answered: int = 0
    questions_failed: int = 0
    questions_timed_out: int = 0
    summaries: int = 0
    watch_evaluations: int = 0
    last_watch_s: Optional[float] = None
    errors: int = 0
    last_error: Optional[str] = None

    _FRAME_FIELDS = (
        "frames_in",
        "frames_rejected",
        "frames_skipped",
        "frames_dropped",
        "frames_into_memory",
        "frame_size_changes",
        "frame_size_mismatches",
        "stamp_jumps",
        "last_update_time",
        "last_update_s",
        "last_batch_size",
    )

    def frame_state(self) -> dict:
        return {k: getattr(self, k) for k in self._FRAME_FIELDS}

    def reset_frames(self, state: Optional[dict] = None):
        """Zero the frame counters, or set them from a saved frame_state() (missing ones: zero)."""
        state = {**_Counters().frame_state(), **(state or {})}
        for k in self._FRAME_FIELDS:
            setattr(self, k, state[k])
        self.frame_size_note = self.stamp_note = None

    @classmethod
    def check_saved(cls, state) -> dict:
        """A saved frame_state() checked field by field; ValueError names the first bad one."""
        if not isinstance(state, dict):
            raise ValueError(f"counters must be an object, got {type(state).__name__}")
        for k, v in state.items():
            if k not in cls._FRAME_FIELDS:
                raise ValueError(f"unknown counter {k!r}")
            if k in ("last_update_time", "last_update_s"):
                _check_number(f"counters.{k}", v, optional=True)
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"counters.{k} must be an integer >= 0, got {v!r}")
        return state


class Generation(Protocol):
    """What the engine reads of a model's answer (fvs_ros.model.video_lm.Generation)."""

    text: str
    token_ids: list[int]
    ttft_s: float


class VideoModel(PrefixModel, Protocol):
    """What the engine needs of VideoLM (the model seam; tests wrap a VideoLM in proxies of it)."""

    device: torch.device

    def frame_size(self, height: int, width: int) -> tuple[int, int]: ...

    def encode_frames(self, frames: np.ndarray): ...  # -> FrameFeatures (.low, .full, .full_hw)

    def warm_up(self, csm_slots: int, dam_frames: int, max_new_tokens: int) -> None: ...

    def answer(
        self,
        prefix: MemoryPrefix,
        question: str,
        max_new_tokens: int,
        on_token: Optional[TokenCallback] = None,
    ) -> Generation: ...

    def answer_uncached(
        self,
        snapshot: MemorySnapshot,
        question: str,
        max_new_tokens: int,
        system_prompt: str,
        on_token: Optional[TokenCallback] = None,
    ) -> Generation: ...


@dataclass
class _Request:
    prompt: str
    max_new_tokens: int
    on_token: Optional[TokenCallback]
    submitted: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    answer: Optional[Answer] = None
    error: Optional[BaseException] = None
    cancelled: bool = False  # the asker gave up (timeout or cancel): nobody reads the result
    preemptible: bool = False  # automatic summaries give way to any queued request
    received_stamp: Optional[float] = None  # newest frame stamp received when the request arrived
    evidence: bool = False  # measure the answer's evidence (questions, not summaries)
    cancel: Optional[threading.Event] = None  # the asker's ask(cancel=...): set = stop at the next token
    source: Optional[Published] = None  # the memory the generation runs on, once it started
    pieces: list = field(default_factory=list)  # text generated so far: what a timeout or cancel returns
    priority: int = _QUESTION  # _QUESTION or _SUMMARY (its queue order, and its GPU job class)

    def stopped(self) -> bool:
        """Nobody wants the result any more: timed out, or cancelled by the asker."""
        return self.cancelled or (self.cancel is not None and self.cancel.is_set())


class StreamEngine:
    """Fixed-size video memory fed by a frame stream, answering questions from a warm KV prefix.

    Frames: add_frame() validates, samples by stamp and enqueues (never blocks); the frame worker
    encodes batches with the ViT, updates the FlashMemory and publishes an immutable snapshot.
    Questions: ask() queues a request for the LLM worker, which answers from the cached
    [system prompt + memory] prefix, keeps that prefix warm while idle, and writes summaries.
    """

    def __init__(
        self,
        lm: VideoModel,
        memory_config: Optional[MemoryConfig] = None,
        config: Optional[EngineConfig] = None,
        on_summary: Optional[Callable[[Answer], None]] = None,
        watcher: Optional[Watcher] = None,
        on_watch: Optional[Callable[[WatchResult], None]] = None,
        *,
        host: Optional[EngineHost] = None,
        name: str = "",
    ):
        """memory_config defaults to the checkpoint's memory size (lm.memory_defaults).

        host: the EngineHost whose model and GPU gate this stream shares with other streams (cameras);
        None: a host of its own (one camera). name: the stream's name, unique on its host.

        watcher: the conditions evaluated on every new memory prefix (fvs_ros/engine/watch.py); each
        evaluation goes to on_watch (LLM worker thread). Without on_watch nothing is evaluated."""
        self.lm = lm
        self.host = host if host is not None else EngineHost(lm)
        if self.host.lm is not lm:
            raise ValueError("a stream must use its host's model")
        self.name = name
        self.config = config or EngineConfig()
        self.device = torch.device(getattr(lm, "device", "cpu"))
        self.on_summary = on_summary
        self.watcher = watcher if watcher is not None else Watcher()
        self.watcher.on_added = self._wake_llm_worker
        self._watch = WatchRunner(self.watcher, on_watch)
        self._memory_config = memory_config or MemoryConfig(**getattr(lm, "memory_defaults", {}))
        self._memory = FlashMemory(self._memory_config, device=self.device)
        # small copies of the frames the memory retains (evidence images, memory view)
        self._thumbs = ThumbnailStore(self.config.thumbnail_side) if self.config.thumbnail_side else None
        self._save_lock = threading.Lock()  # one save at a time (they write the same directory)
        self._mem_lock = threading.Lock()  # memory object: update / reset / save / load
        self._lock = threading.Lock()  # frame queue, sampling state, counters
        self._frames_cv = threading.Condition(self._lock)  # frame worker waits for frames
        self._idle_cv = threading.Condition(self._lock)  # flush() waits for an empty queue
        self._llm_cv = threading.Condition()  # LLM worker waits for requests / new snapshots
        fps = self.config.frames_per_slot
        self._queue: deque = deque(maxlen=max(1, self.config.queue_size // fps))  # slots: [(frame, stamp)]
        self._requests: list = []  # heap of (priority, seq, _Request)
        self._seq = itertools.count()
        self._counters = _Counters()
        self._epoch = 0
        self._published = Published(self._memory.snapshot(), 0)
        self._prefixes = PrefixCache(
            lm,
            lambda: self._published,
            system_prompt=self.config.system_prompt,
            refresh_s=self.config.prefix_refresh_s,
            max_lag_s=self.config.max_prefix_lag_s,
            chunk_tokens=self.config.prefill_chunk_tokens,
            yield_budget_s=self.config.prefix_yield_budget_s,
            stream=lambda: self._worker_stream(priority=0),
            sync=self._sync,
            on_error=self._record_error,
            on_built=self._wake_llm_worker,  # a new prefix may be due a watch evaluation
            gpu=lambda priority, stale, lane: self.host.gpu(self.name, priority, stale, lane),
        )
        self._summarized: Optional[Published] = None
        self._last_summary_t = time.monotonic()
        self._clock = StreamClock(self.config.stamp_slack_s)  # stream time <-> frame stamps
        self._reset_stream_state()
        self._size_logged_at = -math.inf  # time.monotonic() of the last frame-size-change log line
        self._jump_logged_at = -math.inf  # ... and of the last stamp-jump line
        self._busy = False
        self._threads: list[threading.Thread] = []
        self._workers = WorkerWatch(self._worker_died)
        self._started = self._stopping = False
        self.host.register(name, self)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "StreamEngine":
        """Warm the model up, then start the frame and LLM worker threads (once)."""
        with self._lock:
            if self._started:
                raise EngineError("engine already started (engines cannot be restarted after shutdown)")
            self._started = True
        if self.device.type == "cuda":  # process-wide: see _GIL_SWITCH_S
            sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_S))
        self._check_context()
        memory = self._memory.config
        with self._worker_stream(priority=-1):  # graphs captured here keep the workers' high priority
            self.host.warm_up(
                memory.csm_slots,
                memory.dam_frames,
                self.config.max_new_tokens_limit,
                self.config.frames_per_slot,
            )
        self._threads = [
            self._workers.thread("frame worker", self._frame_loop),
            self._workers.thread("LLM worker", self._llm_loop),
        ]
        for t in self._threads:
            t.start()
        if self.config.prefix_cache:
            self._prefixes.start(self._workers.thread)
        return self

    def _worker_died(self, reason: str):
        """A worker thread ended on an error its loop did not catch (WorkerWatch): the requests
        waiting fail with the reason, and so does every later one (_submit)."""
        with self._llm_cv:
            pending, self._requests = self._requests, []
            self._llm_cv.notify_all()
        self._prefixes.wake()  # a question waiting for a prefix gives up (its abandon() sees it)
        for _, _, req in pending:
            self._finish(req, error=EngineError(reason))
        with self._lock:
            self._counters.errors += 1
            self._counters.last_error = reason

    def _check_context(self):
        """ValueError when the system prompt, a full memory, a question of max_question_chars (one token
        per character at most, about) and the longest answer cannot fit the model's context."""
        budget = getattr(self.lm, "context_budget", None)
        if budget is None:
            return
        m, c = self._memory_config, self.config
        head, context = budget(c.system_prompt, m.csm_slots, m.dam_frames)
        need = head + c.max_question_chars + c.max_new_tokens_limit
        if need > context:
            raise ValueError(
                f"the prompt does not fit the model's context of {context} tokens: system prompt and a "
                f"full memory ({m.csm_slots} CSM + {m.dam_frames} DAM slots) take {head} tokens, a question "
                f"up to {c.max_question_chars} and an answer up to {c.max_new_tokens_limit}: {need}; "
                "shorten system_prompt or lower csm_slots / dam_frames / max_question_chars"
            )

    def shutdown(self):
        """Stop the workers, fail pending requests, wait for in-flight GPU work. Idempotent."""
        with self._lock:
            self._stopping = True
            self._frames_cv.notify_all()
            self._idle_cv.notify_all()
        with self._llm_cv:  # a running generation stops at its next token (see _generate)
            pending, self._requests = self._requests, []
            self._llm_cv.notify_all()
        self._prefixes.wake()
        for _, _, req in pending:
            self._finish(req, error=EngineError("engine shut down before answering"))
        self._prefixes.stop()
        for t in self._threads:
            t.join()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.host.unregister(self.name, self)

    def __enter__(self) -> "StreamEngine":
        return self if self._started else self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ----------------------------------------------------------------- frames

    def add_frame(self, frame: np.ndarray, stamp: float) -> bool:
        """Offer one RGB uint8 HxWx3 frame at stream time `stamp` (seconds).

        Returns True if the frame was taken for memory, False if the sampling rate skipped it.
        Sampled frames are grouped into slots of frames_per_slot consecutive frames; a slot is
        queued when complete (until then its first frame waits, and questions see the memory up
        to the last complete slot). Never blocks: a full queue drops its oldest slot. Raises
        FrameError on bad input.

        Stamps: the stream clock (fvs_ros/engine/clock.py) gives each frame a stream time that never
        decreases (sampling and memory order use it); a stamp that goes back starts a new source
        clock (stamp_jumps, logged); no stamp blocks the stream. Reported stamps are always the
        frames' own (stamp_of). Sizes: the model's size rule (lm.frame_size:
        multiples of 56 within its pixel budget) applied to the first frame gives the stream's
        input size, and every frame is resized straight to it, whatever its own size (memory holds
        one input size until reset); a size change is counted and logged.
        """
        frame_stamp = self._counting_rejects(self._check_frame, frame, stamp)
        with self._lock:
            p = self._admit(frame_stamp)
            t = p.time
            self._follow_size(frame.shape[0], frame.shape[1])
            self._commit_stamp(p)
            self._counters.frames_in += 1
            if not self._due(t):
                self._counters.frames_skipped += 1
                return False
            self._advance(t)
            self._clock.record(p)
            fitted = _fit(frame, self._frame_hw)
            self._slot.append((frame.copy() if fitted is frame else fitted, t))
            if len(self._slot) == self.config.frames_per_slot:
                if len(self._queue) == self._queue.maxlen:
                    self._counters.frames_dropped += len(self._queue[0])
                self._queue.append(self._slot)
                self._slot = []
                self._frames_cv.notify()
        return True

    def offer(self, stamp: float) -> bool:
        """Whether add_frame() would take a frame stamped `stamp` into memory: decided before the
        caller pays for decoding it. A frame the sampling rate skips is counted here (received,
        skipped; its stamp advances the stream) and needs no add_frame(); for a frame it would take
        nothing changes until add_frame(). Raises FrameError for a bad or out-of-order stamp."""
        frame_stamp = self._counting_rejects(_check_stamp_value, stamp)
        with self._lock:
            p = self._admit(frame_stamp)
            if self._due(p.time):
                return True
            self._commit_stamp(p)
            self._counters.frames_in += 1
            self._counters.frames_skipped += 1
        return False

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued slot is in memory (offline replay, tests). False on timeout.

        A slot still waiting for its second frame stays out: it enters with that frame."""
        with self._lock:
            if not self._started:
                raise EngineError("engine not started: flush() would wait forever")
            return self._idle_cv.wait_for(lambda: self._stopping or not (self._queue or self._busy), timeout)

    def _counting_rejects(self, check, *args) -> float:
        """check(*args), the frame's stamp; a FrameError it raises is counted in frames_rejected."""
        try:
            return check(*args)
        except FrameError:
            with self._lock:
                self._counters.frames_rejected += 1
            raise

    def _check_frame(self, frame, stamp) -> float:
        if not isinstance(frame, np.ndarray):
            raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise FrameError(f"frame dtype must be uint8 (RGB 0-255), got {frame.dtype}")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise FrameError(f"frame must have shape HxWx3 (RGB), got {frame.shape}")
        h, w = frame.shape[:2]
        if h == 0 or w == 0:
            raise FrameError(f"frame is empty: {frame.shape}")
        if max(h, w) > self.config.max_frame_side:
            raise FrameError(f"frame {h}x{w} exceeds max_frame_side={self.config.max_frame_side}")
        if min(h, w) < self.config.min_frame_side:
            raise FrameError(
                f"frame {w}x{h} has a side below min_frame_side={self.config.min_frame_side} px: "
                "too small to hold a picture"
            )
        return _check_stamp_value(stamp)

    def _admit(self, stamp: float) -> Placement:
        """Where a frame stamped `stamp` lands on the stream clock (nothing changes yet)."""
        if self._stopping:
            raise EngineError("engine is shut down")
        return self._clock.place(stamp)

    def _commit_stamp(self, p: Placement):
        """The stream is now at the frame placed as `p`; a jump is counted and logged (one line per
        5 s: a source whose stamps always go back would flood the log)."""
        if p.jump:
            self._counters.stamp_jumps += 1
            self._counters.stamp_note = (
                f"frame stamp {p.stamp:.3f} s does not continue its clock (it went back, or another "
                f"clock leapt ahead): the stream goes on from where it is ({self._counters.stamp_jumps} "
                "jumps); reported stamps stay the frames' own"
            )
            now = time.monotonic()
            if now - self._jump_logged_at >= 5.0:
                self._jump_logged_at = now
                log.warning("%s", self._counters.stamp_note)
        self._clock.commit(p)

    def stamp_of(self, t: Optional[float]) -> Optional[float]:
        """The frame stamp a stream time of the memory (a snapshot's stamps) stands for (clock.py)."""
        with self._lock:
            return self._clock.stamp_of(t)

    def _due(self, t: float) -> bool:
        """Memory sampling by stream time: a frame is taken when the next sampling instant is reached."""
        return self.config.sample_fps <= 0 or self._next_due is None or t >= self._next_due - 1e-6

    def _advance(self, t: float):
        """Step on the sampling grid so jittered stamps do not drift; a gap restarts the grid."""
        if self.config.sample_fps <= 0:
            return
        period = 1.0 / self.config.sample_fps
        due = (t if self._next_due is None else self._next_due) + period
        self._next_due = due if due > t else t + period

    def _follow_size(self, h: int, w: int):
        """Keep the stream's model input size (_frame_hw) for a frame of h x w.

        The size follows the frames' own (the model's size rule) while nothing of the stream is in
        memory or being encoded (frames waiting at the old size are resized to the new one); once the
        memory holds frames it keeps their input size until reset, and a frame whose own model size
        differs is resized to it, counted in frame_size_mismatches with a note of the sizes."""
        if (h, w) != self._source_hw:
            try:
                size = tuple(int(v) for v in self.lm.frame_size(h, w))
            except Exception as e:
                self._counters.frames_rejected += 1
                raise FrameError(f"frame {h}x{w} cannot be used by the model: {e}") from e
            old, self._source_hw, self._source_model_hw = self._source_hw, (h, w), size
            if size != self._frame_hw and not self._published.snapshot.frames_seen and not self._busy:
                self._frame_hw = size  # frames waiting at the old size follow it
                self._slot = [(_fit(f, size), t) for f, t in self._slot]
                for i, slot in enumerate(self._queue):
                    self._queue[i] = [(_fit(f, size), t) for f, t in slot]
            if old is not None:
                self._counters.frame_size_changes += 1
                now = time.monotonic()
                if now - self._size_logged_at >= 5.0:  # a source alternating sizes: one line per 5 s
                    self._size_logged_at = now
                    log.warning(
                        "frame size changed from %dx%d to %dx%d (%d changes so far): frames are resized "
                        "to the stream's model input %dx%d",
                        old[1],
                        old[0],
                        w,
                        h,
                        self._counters.frame_size_changes,
                        self._frame_hw[1],
                        self._frame_hw[0],
                    )
        if self._source_model_hw != self._frame_hw:
            c, (mh, mw), (fh, fw) = self._counters, self._source_model_hw, self._frame_hw
            c.frame_size_mismatches += 1
            c.frame_size_note = (
                f"frames of {w}x{h} are resized to the memory's input {fw}x{fh} (their own model size is "
                f"{mw}x{mh}; the memory holds one input size until reset)"
            )

    def _reset_stream_state(self):
        self._queue.clear()
        self._slot: list = []  # sampled frames of the slot being filled: dropped by reset/load, not saved
        self._clock.reset()
        self._next_due: Optional[float] = None
        self._source_hw: Optional[tuple[int, int]] = None  # the latest frame's size ...
        self._source_model_hw: Optional[tuple[int, int]] = None  # ... and the model's size for it
        self._frame_hw: Optional[tuple[int, int]] = None  # the model input size every frame is resized to

    # ----------------------------------------------------------------- frame worker

    def _frame_loop(self):
        with torch.inference_mode(), self._worker_stream(priority=-1):
            while True:
                taken = self._take_batch()
                if taken is None:
                    return
                try:
                    self._encode_batch(*taken)
                except Exception as e:  # noqa: BLE001 - one failed batch, not the worker
                    self._record_error("frame worker", e)
                finally:
                    with self._lock:
                        self._busy = False
                        self._idle_cv.notify_all()

    def _take_batch(self):
        with self._lock:
            self._frames_cv.wait_for(lambda: self._stopping or self._queue)
            if self._stopping:
                return None
            n = min(len(self._queue), max(1, self.config.max_batch // self.config.frames_per_slot))
            batch = [self._queue.popleft() for _ in range(n)]  # whole slots: pairs never split
            self._busy = True
            return batch, self._epoch

    def _encode_batch(self, batch, epoch: int):
        try:
            with self._prefixes.gpu_busy("frames"), self.host.gpu(self.name, Priority.FRAMES):
                self._encode_and_update(batch, epoch)
        finally:
            self._prefixes.memory_changed()
            with self._llm_cv:  # the LLM worker's summary looks at the new snapshot
                self._llm_cv.notify_all()

    def _encode_and_update(self, batch, epoch: int):
        t0 = time.perf_counter()
        fps = self.config.frames_per_slot
        try:
            frames = np.stack(
                [f for slot in batch for f, _ in slot]
            )  # at the stream's input size (add_frame)
            # a slot's stamp is its last frame's: an answer's last_stamp is the newest frame it saw
            stamps = torch.tensor([slot[-1][1] for slot in batch], dtype=torch.float64)
            feats = self.lm.encode_frames(frames, fps)
            thumbs = []  # a slot's thumbnail: its last frame too (the one its stamp names)
            if self._thumbs is not None:
                thumbs = [thumbnail(f, self._thumbs.side) for f in frames[fps - 1 :: fps]]
            with self._mem_lock:
                if epoch != self._epoch:  # reset() or load() while encoding: drop the old stream's frames
                    return
                first = self._published.first_stamp if self._memory.frames_seen else batch[0][0][1]
                snap = self._memory.update(feats.low, feats.full, stamps, feats.full_hw)
                self._keep_thumbnails(snap, thumbs)
                self._sync()
                with self._lock:  # memory and counters change together: reset() cannot come between
                    c = self._counters
                    c.frames_into_memory += len(batch) * fps
                    c.last_update_time, c.last_update_s, c.last_batch_size = (
                        time.time(),
                        time.perf_counter() - t0,
                        len(batch) * fps,
                    )
                    self._published = Published(snap, epoch, first)
        except Exception as e:  # noqa: BLE001 - a bad batch must not kill the worker
            self._record_error("frame worker", e)

    def _keep_thumbnails(self, snap: MemorySnapshot, thumbs: list) -> None:
        """Thumbnails of the batch just absorbed (its last len(thumbs) slots), then only those of the
        frames the memory still retains."""
        if self._thumbs is None:
            return
        first = snap.frames_seen - len(thumbs)
        for i, image in enumerate(thumbs):
            self._thumbs.add(first + i, image)
        self._thumbs.retain(snap.bank_slots.tolist())

    def memory_view(self, **layout) -> MemoryView:
        """The newest memory drawn as a picture (memory_view.render_memory_view; layout: its options)."""
        snap = self._published.snapshot
        thumbs = self._thumbs.take(snap.dam_slots.tolist()) if self._thumbs is not None else {}
        return render_memory_view(snap, thumbs, **layout)

    @property
    def thumbnail_bytes(self) -> int:
        """Bytes held by the thumbnails of retained frames (bounded by the memory's bank capacity)."""
        return self._thumbs.nbytes if self._thumbs is not None else 0

    # ----------------------------------------------------------------- questions

    def ask(
        self,
        question: str,
        max_new_tokens: Optional[int] = None,
        timeout: Optional[float] = None,
        on_token: Optional[TokenCallback] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Answer:
        """Answer a question from the memory as it is now (blocking, thread-safe).

        on_token receives text pieces as they are generated (called on the LLM worker thread).
        Setting `cancel` (from any thread) ends the request: ask() raises AnswerCancelled at once and
        the generation stops at its next token, or never starts if still queued.
        Raises QuestionError (bad input), AnswerTimeout (request cancelled; the text generated until
        then in .partial), AnswerCancelled, EngineError.
        """
        question = self._check_question(question)
        n = self._check_tokens(max_new_tokens)
        return self._submit(_QUESTION, question, n, timeout, on_token, cancel, evidence=True)

    def summarize(
        self,
        prompt: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Answer:
        """Scene summary with EngineConfig.summary_prompt (served after pending questions)."""
        prompt = self._check_question(prompt or self.config.summary_prompt)
        n = self._check_tokens(max_new_tokens or self.config.summary_max_new_tokens)
        return self._submit(_SUMMARY, prompt, n, timeout, None)

    def _check_question(self, question) -> str:
        if not isinstance(question, str) or not question.strip():
            raise QuestionError("question must be a non-empty string")
        question = question.strip()
        if len(question) > self.config.max_question_chars:
            raise QuestionError(
                f"question has {len(question)} characters; the limit is "
                f"{self.config.max_question_chars} (EngineConfig.max_question_chars)"
            )
        return question

    def _check_tokens(self, n: Optional[int]) -> int:
        n = self.config.max_new_tokens if n is None else n
        limit = self.config.max_new_tokens_limit
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            raise QuestionError(f"max_new_tokens must be an integer in [1, {limit}], got {n!r}")
        return n

    def _submit(
        self,
        priority: int,
        prompt: str,
        max_new_tokens: int,
        timeout: Optional[float],
        on_token: Optional[TokenCallback],
        cancel: Optional[threading.Event] = None,
        evidence: bool = False,
    ) -> Answer:
        timeout = self.config.answer_timeout_s if timeout is None else timeout
        if not timeout > 0:
            raise QuestionError(f"timeout must be > 0 seconds, got {timeout}")
        req = _Request(
            prompt,
            max_new_tokens,
            on_token,
            received_stamp=self._received_stamp(),
            evidence=evidence,
            cancel=cancel,
            priority=priority,
        )
        with self._llm_cv:
            if not self._started or self._stopping:
                raise EngineError("engine is not running (call start(); engines stop at shutdown())")
            if self._workers.failure is not None:
                raise EngineError(f"the engine cannot answer: {self._workers.failure}")
            heapq.heappush(self._requests, (priority, next(self._seq), req))
            self._llm_cv.notify_all()
        self._prefixes.wake()  # a summary waiting for a prefix gives way to this request
        if not self._wait(req, timeout, cancel):
            asked = cancel is not None and cancel.is_set()
            with self._lock:  # against _finish: a request ends once, answered/failed or timed out
                req.cancelled = req.answer is None and req.error is None
                if req.cancelled and not asked:
                    self._counters.questions_timed_out += 1
            if req.cancelled:
                self._prefixes.wake()  # a wait for a prefix on its behalf ends
                if asked:
                    raise AnswerCancelled("cancelled", self._partial(req))
                pieces = list(req.pieces)
                raise AnswerTimeout(
                    f"no answer within {timeout:.3g} s; the request was cancelled"
                    + (f" after {len(pieces)} text piece(s)" if pieces else " before its first token"),
                    "".join(pieces),
                    len(pieces),
                )
        if req.error is not None:
            raise req.error
        return req.answer

    def _partial(self, req: _Request) -> Optional[Answer]:
        """What a cancelled request had generated, and from which memory (None: not started)."""
        pub = req.source
        if pub is None:
            return None
        pieces, snap = list(req.pieces), pub.snapshot
        dt = time.perf_counter() - req.submitted
        return Answer(
            text="".join(pieces),
            frames_seen=int(snap.frames_seen) * self.config.frames_per_slot,
            frames_in_memory=int(len(snap.csm_weights)),
            first_stamp=self.stamp_of(pub.first_stamp),
            last_stamp=self.stamp_of(snap.last_stamp),
            ttft_s=dt,
            total_s=dt,
            num_tokens=len(pieces),
            frames_per_slot=self.config.frames_per_slot,
            memory_lag_s=self._memory_lag(req, snap),
        )

    @staticmethod
    def _wait(req: _Request, timeout: float, cancel: Optional[threading.Event]) -> bool:
        """Wait for the request's end; False on timeout, or within 20 ms of `cancel` being set."""
        if cancel is None:
            return req.done.wait(min(timeout, threading.TIMEOUT_MAX))
        deadline = time.monotonic() + timeout
        while not req.done.wait(min(0.02, max(deadline - time.monotonic(), 0.0))):
            if cancel.is_set() or time.monotonic() >= deadline:
                return False
        return True

    # ----------------------------------------------------------------- LLM worker

    def _llm_loop(self):
        with torch.inference_mode(), self._worker_stream(priority=-1):
            while True:
                job = self._next_llm_job()
                if job is None:
                    return
                run, req = job
                try:
                    run()
                except Exception as e:  # noqa: BLE001 - the job fails with its reason, the loop goes on
                    if req is not None:
                        error = EngineError(f"the request failed: {type(e).__name__}: {e}")
                        error.__cause__ = e
                        self._finish(req, error=error)
                    self._record_error("LLM worker", e)

    def _next_llm_job(self) -> Optional[tuple[Callable[[], None], Optional[_Request]]]:
        """(job, its request or None): queued requests first (questions before summarize() calls),
        then the watched conditions on a new prefix, then the periodic summary."""
        with self._llm_cv:
            while not self._stopping:
                while self._requests:
                    _, _, req = heapq.heappop(self._requests)
                    if not req.stopped():
                        return functools.partial(self._serve, req), req
                p = self._prefixes.current
                if p is not None and p.source.epoch == self._published.epoch:
                    if self._watch.due((p.source.epoch, p.source.snapshot.version)):
                        return functools.partial(self._evaluate_watch, p), None
                wait_summary = self._summary_wait()
                if wait_summary == 0:
                    return self._auto_summary, None
                self._llm_cv.wait(wait_summary)
            return None

    def _wake_llm_worker(self):
        with self._llm_cv:
            self._llm_cv.notify_all()

    def _evaluate_watch(self, p: Prefix):
        """Every watched condition on the prefix `p` in one batched prefill (WatchRunner)."""
        src, count = p.source, self.config.evidence_frames

        def ground(shares):  # an event's evidence: the blocks its condition attended to most
            return self._own_stamps(evidence_items(shares, src.snapshot, count, self._thumbs))

        try:
            # the builder pauses between chunks meanwhile
            with self._prefixes.gpu_busy("answer"), self.host.gpu(self.name, Priority.WATCH):
                result = self._watch.run(
                    self.lm,
                    p.prefix,
                    (src.epoch, src.snapshot.version),
                    stamp=self.stamp_of(src.snapshot.last_stamp),
                    frames_seen=int(src.snapshot.frames_seen) * self.config.frames_per_slot,
                    memory_updated_at=src.updated_at,
                    sync=self._sync,
                    ground=ground if count else None,
                )
        except Exception as e:  # noqa: BLE001 - a failed evaluation (or callback) must not kill the worker
            self._record_error("watch", e)
            return
        with self._lock:
            self._counters.watch_evaluations += 1
            self._counters.last_watch_s = result.evaluation_s

    def _summary_wait(self) -> Optional[float]:
        pub = self._published
        if (
            self.on_summary is None
            or self.config.summary_period_s <= 0
            or pub.snapshot.frames_seen == 0
            or pub is self._summarized
        ):
            return None
        return max(0.0, self._last_summary_t + self.config.summary_period_s - time.monotonic())

    def _serve(self, req: _Request):
        try:
            answer = self._generate(req)
        except _Cancelled:  # the asker timed out (nobody reads this), cancelled, or the engine is stopping
            asked = req.cancel is not None and req.cancel.is_set()
            self._finish(
                req,
                error=AnswerCancelled("cancelled", self._partial(req))
                if asked
                else EngineError(self._workers.failure or "engine shut down before answering"),
            )
            return
        except Exception as e:  # noqa: BLE001
            self._record_error("answer", e)
            error = EngineError(f"the model failed to answer: {type(e).__name__}: {e}")
            error.__cause__ = e
            self._finish(req, error=error)
            return
        finally:
            self._sync()
        self._finish(req, answer=answer)

    def _finish(self, req: _Request, answer: Optional[Answer] = None, error: Optional[EngineError] = None):
        """End a request once: nothing if its asker already timed out (counted there), else hand over
        the answer or the error and count it (a shutdown's error counts nowhere)."""
        with self._lock:
            if req.cancelled or req.done.is_set():
                return
            c = self._counters
            if answer is not None:
                c.questions_answered += 1
                c.last_ttft_s, c.last_answer_s = answer.ttft_s, answer.total_s
            elif error.__cause__ is not None:
                c.questions_failed += 1
            req.answer, req.error = answer, error
        req.done.set()

    def _auto_summary(self):
        pub = self._published
        self._summarized, self._last_summary_t = pub, time.monotonic()
        req = _Request(
            self.config.summary_prompt,
            self.config.summary_max_new_tokens,
            None,
            preemptible=True,
            received_stamp=self._received_stamp(),
            priority=_SUMMARY,
        )
        try:
            answer = self._generate(req)
        except _Cancelled:  # a question arrived: it goes first, the summary is redone afterwards
            self._summarized = None
            return
        except Exception as e:  # noqa: BLE001
            self._record_error("summary", e)
            return
        finally:
            self._sync()
        with self._lock:
            self._counters.summaries += 1
        try:
            self.on_summary(answer)
        except Exception as e:  # noqa: BLE001
            self._record_error("on_summary callback", e)

    def _generate(self, req: _Request) -> Answer:
        pub = self._published
        snap = pub.snapshot
        if snap.frames_seen == 0:
            return self._no_video_answer(req)

        def on_token(piece: str):  # runs inside lm.answer: raising here stops the generation
            if req.stopped() or self._stopping or (req.preemptible and self._requests):
                raise _Cancelled
            req.pieces.append(piece)
            if req.on_token is not None:
                req.on_token(piece)

        kw = {"evidence": True} if req.evidence and self.config.evidence_frames else {}
        gpu = self.host.gpu(self.name, Priority.SUMMARY if req.priority == _SUMMARY else Priority.QUESTION)
        if self.config.prefix_cache:
            got = self._prefixes.get(
                pub,
                lambda: (
                    req.stopped()
                    or self._stopping
                    or self._workers.failure is not None
                    or (req.preemptible and bool(self._requests))
                ),
            )
            if got is None:
                raise _Cancelled
            prefix, hit = got
            pub = req.source = prefix.source
            snap = pub.snapshot
            t_gen = time.perf_counter()
            with self._prefixes.gpu_busy("answer"), gpu:
                gen = self.lm.answer(prefix.prefix, req.prompt, req.max_new_tokens, on_token=on_token, **kw)
        else:
            hit, req.source = False, pub
            t_gen = time.perf_counter()
            with gpu:
                gen = self.lm.answer_uncached(
                    snap, req.prompt, req.max_new_tokens, self.config.system_prompt, on_token=on_token, **kw
                )
        if req.stopped():
            raise _Cancelled
        grounding = {}
        if gen.attention is not None:
            grounding = dict(
                evidence=self._own_stamps(
                    evidence_items(gen.attention.shares(), snap, self.config.evidence_frames, self._thumbs)
                ),
                memory_attention=gen.attention.memory_fraction,
                evidence_s=gen.attention.seconds,
            )
        fps = self.config.frames_per_slot
        return Answer(
            text=gen.text,
            frames_seen=int(snap.frames_seen) * fps,
            frames_in_memory=int(len(snap.csm_weights)),
            first_stamp=self.stamp_of(pub.first_stamp),
            last_stamp=self.stamp_of(snap.last_stamp),
            ttft_s=t_gen - req.submitted + gen.ttft_s,
            total_s=time.perf_counter() - req.submitted,
            num_tokens=len(gen.token_ids),
            from_cache=hit,
            frames_per_slot=fps,
            memory_lag_s=self._memory_lag(req, snap),
            **grounding,
        )

    def _own_stamps(self, items) -> tuple[EvidenceItem, ...]:
        """Evidence items with the frames' own stamps (they are computed on stream time)."""
        with self._lock:
            of = self._clock.stamp_of
            return tuple(
                dataclasses.replace(i, stamp=of(i.stamp), span=(of(i.span[0]), of(i.span[1]))) for i in items
            )

    def _received_stamp(self) -> Optional[float]:
        with self._lock:
            return self._clock.last

    @staticmethod
    def _memory_lag(req: _Request, snap: MemorySnapshot) -> Optional[float]:
        if snap.last_stamp is None or snap.frames_seen == 0:
            return None
        if req.received_stamp is None:  # every frame in memory arrived after the question
            return 0.0
        return max(0.0, req.received_stamp - float(snap.last_stamp))

    def _no_video_answer(self, req: _Request) -> Answer:
        """Without frames the LLM is not run: an answer about unseen video would be invented."""
        text = self.config.no_video_answer
        if req.on_token is not None:
            req.on_token(text)
        dt = time.perf_counter() - req.submitted
        return Answer(text, 0, 0, None, None, dt, dt, 0, False, self.config.frames_per_slot)

    # ----------------------------------------------------------------- state

    def reset(self):
        """Forget the stream: empty memory (of the configured sizes) and queue; sampling, stamps and
        frame size start over; watched conditions stay, inactive again."""
        with self._mem_lock, self._lock:
            self._epoch += 1
            self._reset_stream_state()
            self._counters.reset_frames()
            if self._memory.config == self._memory_config:
                self._memory.reset()
            else:  # a restored memory of other sizes (see load) gives way to the configured ones
                self._memory = FlashMemory(self._memory_config, device=self.device)
            if self._thumbs is not None:
                self._thumbs.clear()
            self._published = Published(self._memory.snapshot(), self._epoch)
        self._prefixes.memory_changed()
        try:
            self.watcher.reset()
        except WatchError as e:
            self._record_error("watch reset", e)
        with self._llm_cv:
            self._llm_cv.notify_all()

    def save(self, path, extra: Optional[dict] = None) -> Path:
        """Write memory and stream state to directory `path`, crash-safe (fvs_ros.engine.persistence: a
        process killed during a save leaves the previous save or this one, never neither).

        `extra`: JSON-able state of the caller saved alongside and returned by load(). The state is
        copied under the engine's locks and written after them, so frames keep flowing meanwhile.
        Frames still queued are not in memory and are not saved; call flush() first to include them.
        A slot waiting for its second frame is not saved either (after load() the next sampled frame
        starts a new slot).
        """
        with self._save_lock:
            with self._mem_lock, self._lock:
                memory = self._memory.state()
                index = {
                    "format": _SAVE_FORMAT,
                    "frames_per_slot": self.config.frames_per_slot,
                    "first_stamp": self._published.first_stamp,
                    "source_size": self._source_hw,
                    "frame_size": self._frame_hw,
                    "clock": self._clock.state(),
                    "next_due": self._next_due,
                    "counters": self._counters.frame_state(),
                    "extra": dict(extra or {}),
                }
            write_saved(Path(path), lambda f: torch.save(memory, f), index)
        return Path(path)

    def load(self, path) -> dict:
        """Replace memory and stream state with those of save(path); queued frames are dropped.

        Returns the saved `extra`. Raises NothingSaved (a FileNotFoundError) when nothing was saved
        at `path`, SavedStateError when what is there cannot be restored: unreadable, a field of the
        wrong type or range, or a memory this model cannot continue (other feature size or input
        size). A memory saved with other csm_slots / dam_frames is restored with its own sizes,
        which stay until reset() (then the configured sizes apply); nothing is dropped.
        """
        index, memory_file = read_saved(Path(path))
        try:
            state = _checked_index(index)
            memory = FlashMemory.load(memory_file, device=self.device)
        except (ValueError, MemoryFileError) as e:
            raise SavedStateError(f"cannot restore {path}: {e}") from e
        if state["frames_per_slot"] != self.config.frames_per_slot:
            raise SavedStateError(
                f"{path} holds a memory of {state['frames_per_slot']}-frame slots; this engine makes "
                f"{self.config.frames_per_slot}-frame slots (EngineConfig.frames_per_slot)"
            )
        self._check_restorable(memory.snapshot(), state, path)
        if memory.config != self._memory_config:
            log.warning(
                "restored memory has csm_slots=%d, dam_frames=%d (configured: %d, %d): it keeps its sizes "
                "until reset",
                memory.config.csm_slots,
                memory.config.dam_frames,
                self._memory_config.csm_slots,
                self._memory_config.dam_frames,
            )
        with self._mem_lock, self._lock:
            self._epoch += 1
            self._reset_stream_state()
            self._memory = memory
            if self._thumbs is not None:  # the loaded memory's frames: no thumbnails (not saved)
                self._thumbs.clear()
            self._source_hw, self._frame_hw = state["source_size"], state["frame_size"]
            self._source_model_hw = self._frame_hw
            self._clock.restore(state["clock"])
            self._next_due = state["next_due"]
            self._counters.reset_frames(state["counters"])
            snap = memory.snapshot()
            first = state["first_stamp"] if state["first_stamp"] is not None else snap.first_stamp
            self._published = Published(snap, self._epoch, first if snap.frames_seen else None)
        self._prefixes.memory_changed()
        with self._llm_cv:
            self._llm_cv.notify_all()
        return state["extra"]

    def _check_restorable(self, snap: MemorySnapshot, state: dict, path):
        """SavedStateError unless this model can keep adding frames to the restored memory."""
        size = state["frame_size"]
        if snap.frames_seen and size is None:
            raise SavedStateError(f"cannot restore {path}: a memory of frames without a frame_size")
        if size is not None:
            try:
                model_size = tuple(int(v) for v in self.lm.frame_size(*size))
            except Exception as e:  # noqa: BLE001 - the model's own reason
                model_size = f"none ({e})"
            if model_size != size:
                raise SavedStateError(
                    f"cannot restore {path}: its memory holds frames of input size {size[1]}x{size[0]}, "
                    f"which this model resizes to {model_size} (another model or pixel budget)"
                )
        for name in ("first_stamp", "last_stamp"):
            value = getattr(snap, name)
            if value is not None and not abs(value) < STAMP_LIMIT_S:
                raise SavedStateError(
                    f"cannot restore {path}: its memory's {name} {value:g} s is no stream time"
                )
        last = state["clock"]["last"]
        if snap.last_stamp is not None and (last is None or last < snap.last_stamp):
            raise SavedStateError(
                f"cannot restore {path}: its clock ({last}) is behind its memory's newest stamp "
                f"({snap.last_stamp}); new frames could never enter that memory"
            )
        channels = getattr(self.lm, "feature_dim", None)
        if snap.frames_seen and channels is not None and snap.csm_features.shape[-1] != channels:
            raise SavedStateError(
                f"cannot restore {path}: its memory holds {snap.csm_features.shape[-1]}-d features; "
                f"this model makes {channels}-d ones"
            )

    @property
    def memory_config(self) -> MemoryConfig:
        """The sizes of the memory in use (a restored memory keeps its own until reset())."""
        return self._memory.config

    def snapshot(self) -> MemorySnapshot:
        """The newest published memory snapshot (immutable)."""
        return self._published.snapshot

    def stats(self) -> EngineStats:
        pub, p = self._published, self._prefixes.current
        with self._lock:
            c = asdict(self._counters)
            queue_depth, frame_hw = len(self._queue), self._frame_hw
        c["last_prefill_s"] = self._prefixes.last_build_s
        mem = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        return EngineStats(
            running=self._started and not self._stopping and self._workers.failure is None,
            worker_failure=self._workers.failure,
            queue_depth=queue_depth,
            frame_size=frame_hw,
            memory_version=int(pub.snapshot.version),
            frames_seen=int(pub.snapshot.frames_seen) * self.config.frames_per_slot,
            prefix_current=p is not None and p.source is pub,
            device_memory_bytes=mem,
            **c,
        )

    # ----------------------------------------------------------------- helpers

    def _record_error(self, where: str, exc: BaseException):
        """Count and log a worker error (with traceback once; a repeat of the last one logs at debug)."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        message = f"{where}: {type(exc).__name__}: {exc}"
        with self._lock:
            repeated = message == self._counters.last_error
            self._counters.errors += 1
            self._counters.last_error = message
        if repeated:
            log.debug(message)
        else:
            log.error(message, exc_info=exc)

    def _worker_stream(self, priority: int = 0):
        """On CUDA each worker issues its kernels on its own stream so their work overlaps.

        Frames and answers run at the higher priority (-1), the prefix builder at 0: the GPU
        schedules ViT, memory and decode kernels ahead of a queued 10k-token prefix rebuild, so
        frame intake keeps up with the camera and answers stay fast while the prefix refreshes
        (benchmarks/gpu_notes.md)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self.device, priority=priority))

    def _sync(self):
        """Wait for this thread's GPU work before publishing results to the other thread."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def open_engine(
    model_source,
    memory_config: Optional[MemoryConfig] = None,
    config: Optional[EngineConfig] = None,
    *,
    device="auto",
    dtype="auto",
    weights: str = "bf16",
    max_gpu_memory: float = 0.0,
    log: Optional[Callable[[str], None]] = None,
    on_summary: Optional[Callable[[Answer], None]] = None,
    watcher: Optional[Watcher] = None,
    on_watch: Optional[Callable[[WatchResult], None]] = None,
) -> StreamEngine:
    """Load a checkpoint (load_model; raises ModelLoadError) and return a started engine.

    device / dtype / weights: as load_model; 'auto' = CUDA in bfloat16 when available, else CPU in
    float32. Before loading, the memory this engine will take is estimated for these settings,
    printed to `log` and checked against max_gpu_memory (GiB; 0 = the device's free memory): a
    configuration that does not fit raises BudgetExceeded, a ModelLoadError (docs/model.md, "Memory
    budget")."""
    from fvs_ros.model import load_model

    config = config or EngineConfig()
    check = budget_check(config, memory_config, max_gpu_memory, log)
    lm = load_model(model_source, dtype=dtype, device=device, weights=weights, budget=check)
    engine = StreamEngine(
        lm, memory_config, config, on_summary=on_summary, watcher=watcher, on_watch=on_watch
    )
    return engine.start()


def budget_check(config: EngineConfig, memory, max_gpu_memory: float, log):
    """What load_model checks an engine of `config` against (memory: a MemoryConfig, MemoryConfig
    fields over the checkpoint's defaults, or None for the defaults)."""
    from fvs_ros.model import BudgetCheck

    return BudgetCheck(
        memory,
        config.max_new_tokens_limit,
        config.system_prompt,
        config.prefill_chunk_tokens,
        config.max_batch,
        max_gpu_memory,
        log,
    )


def _fit(frame: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bring a frame to the stream's model input size with the model's own resize (PIL bicubic, as
    the checkpoint's processor): a frame gets exactly the pixels encode_frames would give it."""
    if frame.shape[:2] == tuple(hw):
        return frame
    return resize_frames(frame[None], tuple(hw))[0]


def _check_stamp_value(stamp) -> float:
    try:
        return StreamClock.check(stamp)
    except ValueError as e:
        raise FrameError(str(e)) from None


def _check_number(name: str, value, optional: bool = False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or null' if optional else ''}, got {value!r}")


def _check_stamp(name: str, value):
    """A saved stream time: null, or a finite number within the range a stamp holds (clock.py)."""
    _check_number(name, value, optional=True)
    if value is not None and abs(value) >= STAMP_LIMIT_S:
        raise ValueError(
            f"{name} {value:g} s is outside +-2^31 s, the range a ROS time (int32 seconds) holds"
        )


def _check_size(name: str, value) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be null or [height, width] of positive integers, got {value!r}")
    return tuple(value)


def _checked_index(index: dict) -> dict:
    """A saved engine.json checked field by field (ValueError names the field); defaults for fields
    older formats lack."""
    if index.get("format") not in (1, _SAVE_FORMAT):
        raise ValueError(f"engine.json format {index.get('format')!r} is not one this fvs_ros reads")
    state = {
        "source_size": _check_size("source_size", index.get("source_size")),
        "frame_size": _check_size("frame_size", index.get("frame_size")),
        "next_due": index.get("next_due"),
        "counters": _Counters.check_saved(index.get("counters", {})),
        "frames_per_slot": index.get("frames_per_slot", 1),  # saved before slots had a layout: one frame
        "first_stamp": index.get("first_stamp"),
        "extra": index.get("extra", {}),
    }
    if (state["source_size"] is None) != (state["frame_size"] is None):
        raise ValueError("source_size and frame_size must both be set or both null")
    if state["frames_per_slot"] not in (1, 2):
        raise ValueError(f"frames_per_slot must be 1 or 2, got {state['frames_per_slot']!r}")
    for name in ("next_due", "first_stamp"):
        _check_stamp(name, state[name])
    if "clock" in index:
        state["clock"] = StreamClock.checked_state(index["clock"])
    else:  # saved before the stream clock: one stamp offset
        _check_stamp("last_stamp", index.get("last_stamp"))
        _check_number("stamp_offset", index.get("stamp_offset", 0.0))
        state["clock"] = StreamClock.checked_state(
            legacy_state(index.get("last_stamp"), index.get("stamp_offset", 0.0))
        )
    if not isinstance(state["extra"], dict):
        raise ValueError(f"extra must be an object, got {state['extra']!r}")
    return state
