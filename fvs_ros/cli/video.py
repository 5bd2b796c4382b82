"""Run the streaming engine over a video file without ROS: ask questions at given stream times.

    python -m fvs_ros.cli.video VIDEO --model CHECKPOINT --ask "4.5:Where is the ball?" [--ask ...]

Frames are decoded with OpenCV and stamped with their video time. By default the video is fed
as fast as the engine takes it and each question sees every frame up to its time (the engine is
flushed first); with --realtime frames are paced at video speed and questions are asked at their
wall-clock time, like a robot's camera, answering from whatever memory holds then.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Iterator, Optional

import cv2
import numpy as np

from fvs_ros.engine import Answer, EngineConfig, EngineError, StreamEngine
from fvs_ros.engine.settings import engine_config, memory_config
from fvs_ros.engine.stream_engine import budget_check
from fvs_ros.model import ModelLoadError, load_model
from fvs_ros.model.quant import WEIGHT_MODES
from fvs_ros.model.video_lm import DTYPE_NAMES


def parse_question(text: str) -> tuple[float, str]:
    """'4.5:What is on the table?' -> (4.5, 'What is on the table?')."""
    t, _, q = text.partition(":")
    try:
        t = float(t)
    except ValueError:
        t = None
    if t is None or not q.strip():
        raise argparse.ArgumentTypeError(f"expected SECONDS:QUESTION, got {text!r}")
    return t, q.strip()


def read_frames(path: str, end_s: Optional[float] = None) -> Iterator[tuple[np.ndarray, float]]:
    """Yield (RGB uint8 frame, video time in seconds) from a video file."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise SystemExit(f"cannot open video {path!r}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    index = 0
    try:
        while True:
            stamp = index / fps if fps > 0 else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            ok, bgr = cap.read()
            if not ok or (end_s is not None and stamp > end_s):
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), stamp
            index += 1
    finally:
        cap.release()


def format_answer(t: float, question: str, a: Answer) -> str:
    span = "no video" if a.last_stamp is None else f"stream {a.first_stamp:.2f}-{a.last_stamp:.2f} s"
    return (
        f"[t={t:7.2f} s] Q: {question}\n"
        f"              A: {a.text}\n"
        f"              frames_seen={a.frames_seen} in_memory={a.frames_in_memory} {span} "
        f"ttft={a.ttft_s * 1e3:.1f} ms total={a.total_s * 1e3:.1f} ms tokens={a.num_tokens} "
        f"prefix_cache={'hit' if a.from_cache else 'miss'} frames_per_slot={a.frames_per_slot}"
        + ("" if a.memory_lag_s is None else f" memory_lag={a.memory_lag_s:.2f} s")
        + (f"\n              evidence: {format_evidence(a)}" if a.evidence else "")
    )


def format_evidence(a: Answer) -> str:
    """The answer's evidence on one line: share, kind and stream stamps of each item."""
    items = []
    for e in a.evidence:
        where = (
            f"{e.stamp:.2f} s"
            if e.kind == "detail"
            else f"{e.span[0]:.2f}-{e.span[1]:.2f} s ({e.weight} frames)"
        )
        items.append(f"{e.share:.0%} {e.kind} {where}")
    return ", ".join(items)


class _Printer:
    """Prints answers (text or JSON lines) from any thread."""

    def __init__(self, as_json: bool):
        self.as_json, self.lock = as_json, threading.Lock()

    def __call__(self, t: float, question: str, answer: Optional[Answer], error: Optional[str] = None):
        if self.as_json:
            fields = asdict(answer) if answer else {}
            for item in fields.get("evidence", []):
                item.pop("image")  # pixels: not for a JSON line
            line = json.dumps({"t": t, "question": question, "error": error, **fields})
        else:
            line = (
                format_answer(t, question, answer)
                if answer
                else f"[t={t:7.2f} s] Q: {question}\n  ERROR: {error}"
            )
        with self.lock:
            print(line, flush=True)


def _ask(engine: StreamEngine, t: float, question: str, args, out: _Printer):
    try:
        out(t, question, engine.ask(question, args.max_new_tokens, timeout=args.timeout))
    except (EngineError, ValueError) as e:
        out(t, question, None, f"{type(e).__name__}: {e}")


def run(engine: StreamEngine, args, out: _Printer):
    """Feed the video and ask each question once the stream reaches its time."""
    pending = sorted(args.ask)
    pool = ThreadPoolExecutor(max_workers=1) if args.realtime else None
    t0 = time.monotonic()
    for frame, stamp in read_frames(args.video, args.end):
        while pending and pending[0][0] < stamp:
            _dispatch(engine, *pending.pop(0), args, out, pool)
        if args.realtime:
            time.sleep(max(0.0, stamp - (time.monotonic() - t0)))
        engine.add_frame(frame, stamp)
    for t, q in pending:  # questions past the end of the video see the whole video
        _dispatch(engine, t, q, args, out, pool)
    if pool is not None:
        pool.shutdown(wait=True)
    engine.flush()


def _dispatch(engine, t, question, args, out, pool):
    if pool is None:
        engine.flush()
        _ask(engine, t, question, args, out)
    else:
        pool.submit(_ask, engine, t, question, args, out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvs_ros.cli.video", description=__doc__.split("\n")[0])
    p.add_argument("video", help="video file readable by OpenCV")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (load_model)")
    p.add_argument(
        "--ask",
        action="append",
        type=parse_question,
        default=[],
        metavar="SECONDS:QUESTION",
        help="question to ask at this stream time (repeatable)",
    )
    p.add_argument("--realtime", action="store_true", help="pace frames at video speed")
    p.add_argument("--end", type=float, help="stop reading the video after this many seconds")
    p.add_argument("--sample-fps", type=float, default=1.0, help="frames per second into memory (<=0: all)")
    p.add_argument(
        "--frames-per-slot",
        type=int,
        choices=(1, 2),
        default=EngineConfig.frames_per_slot,
        help="sampled frames per memory slot: 2 = two consecutive frames, the trained layout (default); "
        "1 = one frame each. A question sees whole slots only",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per answer")
    p.add_argument(
        "--csm-slots", type=int, help="CSM size (default: the checkpoint's, 60 for plain Qwen2-VL)"
    )
    p.add_argument(
        "--dam-frames", type=int, help="DAM size (default: the checkpoint's, 30 for plain Qwen2-VL)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="auto", help="auto: bfloat16 on CUDA, float32 on CPU"
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default="bf16",
        help="LLM linear layers: bf16 (the checkpoint's numerics), fp8 (Ada/Hopper GPUs), int8 (weight-only)",
    )
    p.add_argument(
        "--max-gpu-memory",
        type=float,
        default=0.0,
        help="GiB the engine may take, checked before loading (0: the device's free memory)",
    )
    p.add_argument("--summary", action="store_true", help="print a scene summary at the end")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = engine_config(
        {
            "memory_fps": args.sample_fps,
            "frames_per_slot": args.frames_per_slot,
            "max_new_tokens": args.max_new_tokens,
        },
        answer_timeout_s=args.timeout,
    )
    sizes = {"csm_slots": args.csm_slots, "dam_frames": args.dam_frames}

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    check = budget_check(config, {k: v for k, v in sizes.items() if v is not None}, args.max_gpu_memory, log)
    try:
        lm = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights, budget=check)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    memory = memory_config(sizes, lm.memory_defaults)
    out = _Printer(args.json)
    print(
        f"memory: slots of {config.frames_per_slot} frame(s), {memory.csm_slots} CSM slots, "
        f"{memory.dam_frames} DAM frames",
        file=sys.stderr,
    )
    engine = StreamEngine(lm, memory, config).start()
    try:
        run(engine, args, out)
        if args.summary:
            _ask_summary(engine, args, out)
        stats = engine.stats()
    finally:
        engine.shutdown()
    print(
        json.dumps({"stats": asdict(stats)})
        if args.json
        else f"frames: {stats.frames_in} read, {stats.frames_into_memory} into memory, "
        f"{stats.frames_skipped} skipped by sampling, {stats.frames_dropped} dropped; errors: {stats.errors}"
        + (f" (last: {stats.last_error})" if stats.last_error else ""),
        file=sys.stderr,
    )
    return 1 if stats.errors else 0


def _ask_summary(engine: StreamEngine, args, out: _Printer):
    t = engine.snapshot().last_stamp or 0.0
    try:
        out(t, "(summary)", engine.summarize(timeout=args.timeout))
    except EngineError as e:
        out(t, "(summary)", None, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
