"""Offline replay: decode a bag's frames and feed a StreamEngine directly (no ROS, no DDS).

As fast as the engine goes, and deterministic: frames are offered in bag order with their
header stamps; the frame worker is drained (engine.flush) every `batch` queued frames and
before each question, and questions may not use a cached prefix older than the memory
(max_prefix_lag_s = 0). So every question sees exactly the frames up to its stream time, and
two runs with the same model, settings and seed give the same answers.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from fvs_ros.bag.bagio import ImageBag
from fvs_ros.bag.images import ImageDecodeError
from fvs_ros.bag.questions import Question

EPS = 1e-6


def answer_fields(a) -> dict:
    """Report fields from an engine Answer (evidence_jpeg: the evidence frames, written by the report)."""
    from fvs_ros.engine.thumbnails import encode_jpeg

    evidence = [
        {
            "kind": e.kind,
            "stamp": e.stamp,
            "share": e.share,
            "span": list(e.span),
            "weight": e.weight,
            "slot": e.slot,
        }
        for e in getattr(a, "evidence", ())
    ]
    jpegs = [None if e.image is None else encode_jpeg(e.image) for e in getattr(a, "evidence", ())]
    return {
        "evidence": evidence,
        "evidence_jpeg": jpegs,
        "answer": a.text,
        "frames_seen": int(a.frames_seen),
        "frames_in_memory": int(a.frames_in_memory),
        "first_stamp": a.first_stamp,
        "last_stamp": a.last_stamp,
        "ttft_s": float(a.ttft_s),
        "total_s": float(a.total_s),
        "num_tokens": int(a.num_tokens),
        "from_cache": bool(getattr(a, "from_cache", False)),
        "memory_lag_s": getattr(a, "memory_lag_s", None),
    }


def run_offline(
    bag: ImageBag,
    questions: list[Question],
    engine,
    *,
    batch: int = 1,
    stamps: str = "header",
    max_new_tokens: Optional[int] = None,
    timeout: float = 600.0,
    on_answer: Optional[Callable[[Question, dict], None]] = None,
    after_update: Optional[Callable[[], None]] = None,
    log=sys.stderr,
) -> tuple[list[dict], dict]:
    """Replay `bag` into a started `engine`, asking each question at its stream time.

    after_update() runs after each flush of the frame worker (watched conditions wait there for
    the evaluation of the new memory).

    Returns (per-question result dicts, frame counters). Result dicts hold `status`
    (answered | failed), `error`, and the answer fields; the caller adds scoring.
    """
    from fvs_ros.engine import EngineError, FrameError

    pending = sorted(questions, key=lambda q: (q.at_end, q.time or 0.0))
    results: dict[str, dict] = {}
    fed = queued = undecodable = rejected = 0
    last_stream = None
    first_error: Optional[str] = None

    def ask(q: Question, stream_now: Optional[float]):
        engine.flush()
        res = {
            "status": "failed",
            "error": None,
            "frames_fed_at_ask": fed,
            "asked_stream_s": stream_now if q.at_end else q.time,
        }
        try:
            a = engine.ask(q.prompt(), max_new_tokens, timeout=timeout)
        except (EngineError, ValueError) as e:  # QuestionError is a ValueError, AnswerTimeout an EngineError
            res["error"] = f"{type(e).__name__}: {e}"
        else:
            res.update(status="answered", **answer_fields(a))
        results[q.id] = res
        if on_answer:
            on_answer(q, res)

    for frame in bag.frames():
        while pending and not pending[0].at_end and pending[0].time < frame.stream_s - EPS:
            ask(pending.pop(0), last_stream)
        last_stream = frame.stream_s
        try:
            rgb = bag.decode(frame)
        except ImageDecodeError as e:
            undecodable += 1
            first_error = first_error or f"frame {frame.index}: {e}"
            continue
        stamp = frame.stamp if stamps == "header" else frame.log_ns / 1e9
        fed += 1
        try:
            if engine.add_frame(rgb, stamp):
                queued += 1
                if queued % batch == 0:
                    engine.flush()
                    if after_update is not None:
                        after_update()
        except FrameError as e:
            rejected += 1
            first_error = first_error or f"frame {frame.index}: {e}"
    engine.flush()
    if after_update is not None:
        after_update()
    for q in pending:
        if q.at_end or (last_stream is not None and q.time <= last_stream + EPS):
            ask(q, last_stream)
        else:
            end = "no frames" if last_stream is None else f"the last frame is at {last_stream:.3f} s"
            results[q.id] = {
                "status": "skipped",
                "frames_fed_at_ask": fed,
                "error": f"{q.where}: time {q.time:.3f} s is beyond the end of the bag's image "
                f"stream ({end}); use time 'end' to ask after the last frame",
            }
    if first_error:
        print(f"[evaluate] {undecodable + rejected} frame(s) not used; first: {first_error}", file=log)
    st = engine.stats()
    if st.errors:
        print(
            f"[evaluate] warning: the engine reported {st.errors} error(s); last: {st.last_error}", file=log
        )
    frames = {
        "in_bag": bag.info.count,
        "sent": fed + undecodable,
        "received": int(st.frames_in),
        "used": int(st.frames_into_memory),
        "skipped_by_sampling": int(st.frames_skipped),
        "dropped": int(st.frames_dropped),
        "rejected": int(st.frames_rejected) + undecodable,
        "engine_errors": int(st.errors),
        "last_frame_stream_s": last_stream,
    }
    return [results[q.id] | {"id": q.id} for q in questions if q.id in results], frames
