"""A question about several streams (cameras) of one host, answered from one prompt.

The streams' newest memories become one video block each (fvs_ros.model.several_videos: the
camera's name, then its memory in the trained layout; positions by Qwen2-VL's rule for several
videos), prefilled together and answered, as one QUESTION job on the host's GPU gate (it waits
for no background work). No prefix of the combination is kept: each such question pays one
prefill of all the memories it names. Its answer carries no evidence items (several memories are
not one evidence layout); its counts add up the cameras', its stamps span them, and its
memory_lag_s is the largest of theirs.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Optional, Sequence

from fvs_ros.engine.scheduler import Priority

if TYPE_CHECKING:
    from fvs_ros.engine.host import EngineHost
    from fvs_ros.engine.stream_engine import Answer, StreamEngine, TokenCallback


class _Stop(Exception):
    """Raised in the token callback: the asker cancelled or timed out."""


def ask_several(
    host: "EngineHost",
    streams: Sequence["StreamEngine"],
    question: str,
    max_new_tokens: Optional[int] = None,
    timeout: Optional[float] = None,
    on_token: Optional["TokenCallback"] = None,
    cancel: Optional[threading.Event] = None,
) -> "Answer":
    """Answer `question` about `streams` (in that order in the prompt) on the calling thread.

    Limits (question length, max_new_tokens, timeout) are the first stream's. Raises QuestionError,
    AnswerTimeout, AnswerCancelled, EngineError (a stream not running, or the model failed)."""
    from fvs_ros.engine.stream_engine import (
        Answer,
        AnswerCancelled,
        AnswerTimeout,
        EngineError,
        QuestionError,
    )
    from fvs_ros.model.several_videos import prefill_videos

    if len(streams) < 2 or len({s.name for s in streams}) != len(streams):
        raise QuestionError("a question about several cameras needs at least two different ones")
    if any(s.host is not host for s in streams):
        raise QuestionError("every camera of a question must be on this host")
    first = streams[0]
    question, n = first._check_question(question), first._check_tokens(max_new_tokens)
    timeout = first.config.answer_timeout_s if timeout is None else timeout
    if not timeout > 0:
        raise QuestionError(f"timeout must be > 0 seconds, got {timeout}")
    t0, deadline = time.perf_counter(), time.monotonic() + timeout

    def stopped() -> bool:
        return (cancel is not None and cancel.is_set()) or time.monotonic() > deadline

    for s in streams:
        if not s.stats().running:
            raise EngineError(f"camera {s.name!r} is not running")
    received = [s._received_stamp() for s in streams]
    published = [s._published for s in streams]
    videos = [
        (s.name, pub.snapshot) for s, pub in zip(streams, published, strict=True) if pub.snapshot.frames_seen
    ]
    fps = first.config.frames_per_slot
    if not videos:
        text = first.config.no_video_answer
        if on_token is not None:
            on_token(text)
        dt = time.perf_counter() - t0
        return Answer(text, 0, 0, None, None, dt, dt, 0, False, fps)

    def stream_token(piece: str):
        if stopped():
            raise _Stop
        if on_token is not None:
            on_token(piece)

    try:
        with host.gpu("+".join(s.name for s in streams), Priority.QUESTION):
            steps = prefill_videos(
                host.lm, videos, first.config.system_prompt, first.config.prefill_chunk_tokens or None
            )
            while True:
                if stopped():
                    raise _Stop
                try:
                    next(steps)
                except StopIteration as done:
                    prefix = done.value
                    break
            t_gen = time.perf_counter()
            gen = host.lm.answer(prefix, question, n, on_token=stream_token)
    except _Stop:
        if cancel is not None and cancel.is_set():
            raise AnswerCancelled("cancelled") from None
        raise AnswerTimeout(f"no answer within {timeout:.3g} s; the request was cancelled") from None
    except Exception as e:  # noqa: BLE001 - the model's failure, named
        raise EngineError(f"the model failed to answer: {type(e).__name__}: {e}") from e
    snaps = [pub.snapshot for pub in published]
    lags = [
        max(0.0, r - float(snap.last_stamp)) if r is not None else 0.0
        for r, snap in zip(received, snaps, strict=True)
        if snap.frames_seen
    ]
    firsts = [
        pub.first_stamp for pub in published if pub.snapshot.frames_seen and pub.first_stamp is not None
    ]
    return Answer(
        text=gen.text,
        frames_seen=sum(int(snap.frames_seen) for snap in snaps) * fps,
        frames_in_memory=sum(int(len(snap.csm_weights)) for snap in snaps),
        first_stamp=min(firsts) if firsts else None,
        last_stamp=max(float(snap.last_stamp) for snap in snaps if snap.frames_seen),
        ttft_s=t_gen - t0 + gen.ttft_s,
        total_s=time.perf_counter() - t0,
        num_tokens=len(gen.token_ids),
        from_cache=False,
        frames_per_slot=fps,
        memory_lag_s=max(lags),
    )
