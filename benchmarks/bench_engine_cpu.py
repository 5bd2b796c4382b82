"""Answer latency through StreamEngine.ask with and without the memory prefix cache (CPU, tiny model).

    python benchmarks/bench_engine_cpu.py [--frames 128] [--questions 5] [--repeats 3]

Writes the tiny random flash_vstream checkpoint (fvs_ros.model.tiny) to a temporary directory,
streams synthetic 16:9 frames (360x640 -> 336x560: 240 DAM + 60 CSM tokens per slot) into two
engines with the paper's memory size (60 CSM slots, 30 DAM frames), one with the prefix cache
warm and one answering every question with a full prefill (EngineConfig.prefix_cache=False),
asks the same questions of both and prints median TTFT and total latency as seen by the caller.
Random weights: the timings are the point; both paths must give the same text.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint


def filled_engine(lm, memory: MemoryConfig, prefix_cache: bool, frames: np.ndarray) -> StreamEngine:
    """An engine whose memory holds all `frames` (one per second), with the prefix built if cached."""
    eng = StreamEngine(
        lm, memory, EngineConfig(sample_fps=0, queue_size=len(frames), prefix_cache=prefix_cache)
    ).start()
    for i, frame in enumerate(frames):
        eng.add_frame(frame, float(i))
    eng.flush()
    while prefix_cache and not eng.stats().prefix_current:
        time.sleep(0.01)
    return eng


def measure(eng: StreamEngine, questions: list[str], repeats: int, max_new_tokens: int):
    """Answers (of the last repeat) and the TTFT / total / token lists over all questions x repeats."""
    ttft, total, tokens, texts = [], [], [], []
    for _ in range(repeats):
        texts = []
        for q in questions:
            a = eng.ask(q, max_new_tokens=max_new_tokens, timeout=600)
            ttft.append(a.ttft_s)
            total.append(a.total_s)
            tokens.append(a.num_tokens)
            texts.append(a.text)
    return texts, ttft, total, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--frames", type=int, default=128, help="frames streamed into memory (two per slot: 64 slots)"
    )
    p.add_argument("--csm-slots", type=int, default=60)
    p.add_argument("--dam-frames", type=int, default=30)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(write_tiny_checkpoint(Path(tmp) / "tiny"), dtype=torch.float32, device="cpu")
    memory = MemoryConfig(csm_slots=args.csm_slots, dam_frames=args.dam_frames)
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, 360, 640, 3), dtype=np.uint8)
    questions = [f"Question {i}: what is happening in the video right now?" for i in range(args.questions)]

    rows, texts, stats = {}, {}, {}
    for name, cached in (("prefix cache (warm)", True), ("no cache (full prefill)", False)):
        eng = filled_engine(lm, memory, cached, frames)
        try:
            eng.ask(questions[0], max_new_tokens=1)  # warm-up
            texts[name], *rows[name] = measure(eng, questions, args.repeats, args.max_new_tokens)
            stats[name] = eng.stats()
        finally:
            eng.shutdown()
    prefix = lm.prefill_memory(eng.snapshot(), EngineConfig().system_prompt)
    same = len(set(map(tuple, texts.values()))) == 1
    stats = stats["prefix cache (warm)"]

    print(
        f"CPU ({torch.get_num_threads()} threads), tiny random flash_vstream checkpoint, float32; memory "
        f"{args.csm_slots} CSM + {args.dam_frames} DAM after "
        f"{stats.frames_seen} frames of {stats.frame_size}: "
        f"{prefix.num_tokens}-token prefix (prefill_memory {1e3 * stats.last_prefill_s:.0f} ms); "
        f"{args.questions} questions x {args.repeats}, <= {args.max_new_tokens} new tokens; "
        f"answers {'identical' if same else 'DIFFER'} on both paths"
    )
    print(f"| {'path':<24} | {'TTFT median':>12} | {'total median':>12} | {'tokens':>6} |")
    print(f"|{'-' * 26}|{'-' * 13}:|{'-' * 13}:|{'-' * 7}:|")
    med = {
        name: (statistics.median(t), statistics.median(s), statistics.median(n))
        for name, (t, s, n) in rows.items()
    }
    for name, (t, s, n) in med.items():
        print(f"| {name:<24} | {1e3 * t:>9.1f} ms | {1e3 * s:>9.1f} ms | {n:>6.0f} |")
    (t1, s1, _), (t0, s0, _) = med.values()
    print(f"| {'ratio (no cache / cache)':<24} | {t0 / t1:>11.1f}x | {s0 / s1:>11.1f}x | {'':>6} |")


if __name__ == "__main__":
    main()
