"""Evidence, thumbnails and the memory view on the CPU (tiny random model, the paper's memory size).

    python benchmarks/bench_evidence.py [--frames 300] [--side 160] [--questions 10]

Streams synthetic 720p frames (1280x720 -> 336x560) into a StreamEngine (60 CSM slots, 30 DAM
frames, bank 120) and prints: the thumbnails held (count, bytes) as the stream grows, the JPEG
size of an evidence image, the memory view's size and render time, and per answer the evidence
cost and TTFT with evidence on and off. The GPU figures (7B shapes) come from
`benchmarks/bench_gpu.py --sections evidence`. Last, cancelling: the TTFT of a question asked
right after cancelling a long answer (ask(cancel=...)), against the time that answer takes in full.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fvs_ros.engine import AnswerCancelled, EngineConfig, StreamEngine
from fvs_ros.engine.thumbnails import encode_jpeg
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint


def scenes(n: int, seed: int = 0) -> np.ndarray:
    """n 720p frames: 12 scenes (colour gradients) revisited, with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 1280, dtype=np.float32)[None, :, None]
    bases = [(rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 128, 3)).clip(0, 255) for _ in range(12)]
    which = rng.integers(0, 12, n // 20 + 1).repeat(20)[:n]
    out = np.empty((n, 720, 1280, 3), np.uint8)
    for i, s in enumerate(which):
        out[i] = np.broadcast_to(bases[s], (720, 1280, 3)) + rng.integers(0, 12, (1, 1280, 3), dtype=np.uint8)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--side", type=int, default=160, help="thumbnail_side")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(write_tiny_checkpoint(Path(tmp) / "tiny"), dtype=torch.float32, device="cpu")
    memory = MemoryConfig(csm_slots=60, dam_frames=30, bank_capacity=120)
    frames = scenes(args.frames)
    engines = {
        on: StreamEngine(
            lm,
            memory,
            EngineConfig(
                sample_fps=0,
                queue_size=args.frames,
                thumbnail_side=args.side,
                evidence_frames=3 if on else 0,
            ),
        ).start()
        for on in (True, False)
    }
    try:
        print(
            f"CPU ({torch.get_num_threads()} threads), tiny random model, memory 60 CSM / 30 DAM / bank 120"
        )
        print("| frames fed | thumbnails held (one per retained slot) | thumbnail bytes |")
        print("|---:|---:|---:|")
        eng = engines[True]
        for i, frame in enumerate(frames):
            for e in engines.values():
                e.add_frame(frame, 100.0 + i)
            if (i + 1) % max(1, args.frames // 5) == 0:
                eng.flush()
                held = len(eng.snapshot().bank_slots)
                print(f"| {i + 1} | {held} | {eng.thumbnail_bytes / 2**20:.2f} MiB |")
        for e in engines.values():
            e.flush()
            while not e.stats().prefix_current:  # idle engines: nothing else holds the GIL
                time.sleep(0.05)
        renders = []
        for _ in range(5):
            t0 = time.perf_counter()
            view = eng.memory_view()
            renders.append(time.perf_counter() - t0)
        render = statistics.median(renders)
        print(
            f"memory view: {view.image.shape[1]}x{view.image.shape[0]} rgb8, "
            f"rendered in {1e3 * render:.1f} ms"
        )
        questions = [f"Question {i}: what happened in the video?" for i in range(args.questions)]
        rows = {}
        for on, e in engines.items():
            e.ask(questions[0], max_new_tokens=1, timeout=600)  # warm-up
            answers = [e.ask(q, max_new_tokens=args.max_new_tokens, timeout=600) for q in questions]
            rows[on] = answers
        with_ev = rows[True]
        jpeg = [
            len(encode_jpeg(item.image)) for a in with_ev for item in a.evidence if item.image is not None
        ]
        print(f"evidence image: {statistics.median(jpeg) / 1024:.1f} KiB JPEG (median of {len(jpeg)})")
        print("| evidence | TTFT median | evidence cost median | tokens |")
        print("|---|---:|---:|---:|")
        for on, answers in rows.items():
            ttft = statistics.median(a.ttft_s for a in answers)
            cost = statistics.median(a.evidence_s for a in answers)
            tokens = statistics.median(a.num_tokens for a in answers)
            print(f"| {'on' if on else 'off'} | {1e3 * ttft:.1f} ms | {1e3 * cost:.2f} ms | {tokens:.0f} |")
        cancel_figures(eng, questions[0])
    finally:
        for e in engines.values():
            e.shutdown()


def cancel_figures(eng: StreamEngine, question: str, long_tokens: int = 512, reps: int = 5) -> None:
    """TTFT right after cancelling a long answer vs that answer's full duration."""
    full = eng.ask(question, max_new_tokens=long_tokens, timeout=600).total_s
    after = []
    for _ in range(reps):
        cancel, started = threading.Event(), threading.Event()

        def on_token(_piece, started=started):
            started.set()

        def long_answer(cancel=cancel, on_token=on_token):
            try:
                eng.ask(question, max_new_tokens=long_tokens, timeout=600, on_token=on_token, cancel=cancel)
            except AnswerCancelled:
                pass

        worker = threading.Thread(target=long_answer)
        worker.start()
        started.wait(60)
        cancel.set()
        after.append(eng.ask("And now?", max_new_tokens=4, timeout=600).ttft_s)
        worker.join()
    print(
        f"cancel: a {long_tokens}-token answer takes {1e3 * full:.0f} ms in full; a question asked right "
        f"after cancelling one: TTFT median {1e3 * statistics.median(after):.1f} ms "
        f"(max {1e3 * max(after):.1f})"
    )


if __name__ == "__main__":
    main()
