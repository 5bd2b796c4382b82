"""N cameras on one model (EngineHost), CPU, tiny random model: frames absorbed and answer latency.

    python benchmarks/bench_cameras_cpu.py [--cameras 1,2,4] [--seconds 20] [--fps 10]

For each N: one EngineHost on one tiny random flash_vstream checkpoint, N streams, each fed
112x224 frames at --fps from a thread of its own (stamps = stream time, --memory-fps sampled into
memory, two-frame slots), while one asker puts a question every 1-3 s (seeded) to a random
camera, and with N >= 2 every third question to two cameras at once (one prompt, both memories).
Prints per N: frames sampled / absorbed into memory / dropped, single-camera TTFT p50 / p99,
two-camera TTFT p50 / p99, memory_lag_s p95 of the camera asked, and the number of models loaded
(1 whatever N). Random weights: the timings are the point. A CPU stand-in for issue 20's GPU
benchmark (bench_gpu.py --sections cameras, not written yet): on a shared 2-core machine the
figures say how the one scheduler shares a CPU between cameras, not what a GPU does.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fvs_ros.engine import EngineConfig, EngineHost
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint

Q = "What is happening?"


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def ms(values, q):
    return 1000 * pct(values, q)


def run(lm, n: int, seconds: float, fps: float, memory_fps: float, seed: int) -> dict:
    host = EngineHost(lm)
    config = EngineConfig(sample_fps=memory_fps, max_new_tokens=8, max_prefix_lag_s=2.0, prefix_refresh_s=1.0)
    memory = MemoryConfig(csm_slots=16, dam_frames=8)
    streams = [host.open_stream(f"cam{i}", memory, config).start() for i in range(n)]
    stop = threading.Event()

    def feed(eng, k):
        rng = np.random.default_rng(seed + k)
        frames = rng.integers(0, 256, (8, 112, 224, 3), dtype=np.uint8)
        t0, i = time.monotonic(), 0
        while not stop.is_set():
            eng.add_frame(frames[i % len(frames)], 1000.0 + i / fps)
            i += 1
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))

    feeders = [threading.Thread(target=feed, args=(s, k), daemon=True) for k, s in enumerate(streams)]
    for t in feeders:
        t.start()
    time.sleep(3.0)  # the first slots reach memory
    rng = random.Random(seed)
    single, multi, lags = [], [], []
    end, asked = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        asked += 1
        if n >= 2 and asked % 3 == 0:
            pair = rng.sample(streams, 2)
            multi.append(host.ask_several(pair, Q, timeout=120).ttft_s)
        else:
            a = rng.choice(streams).ask(Q, timeout=120)
            single.append(a.ttft_s)
            if a.memory_lag_s is not None:
                lags.append(a.memory_lag_s)
        time.sleep(rng.uniform(1.0, 3.0))
    stop.set()
    for t in feeders:
        t.join()
    for s in streams:  # what is queued still goes into memory (a slot's first frame waits for its second)
        s.flush(60)
    stats = [s.stats() for s in streams]
    host.shutdown()
    sampled = sum(s.frames_in - s.frames_skipped for s in stats)
    return {
        "sampled": sampled,
        "absorbed": sum(s.frames_into_memory for s in stats),
        "dropped": sum(s.frames_dropped for s in stats),
        "single": single,
        "multi": multi,
        "lag_p95": pct(lags, 95),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", default="1,2,4", help="camera counts, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of questions per camera count")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second each camera sends")
    p.add_argument("--memory-fps", type=float, default=1.0, help="frames per second sampled into memory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(write_tiny_checkpoint(Path(tmp) / "tiny", "flash_vstream"))
        print(
            f"cameras at {args.fps:g} fps, memory_fps {args.memory_fps:g}, "
            f"{args.seconds:g} s of questions each"
        )
        print(
            "N | sampled / absorbed / dropped | TTFT 1 cam p50 / p99 (n) | "
            "TTFT 2 cams p50 / p99 (n) | lag p95 | models"
        )
        for n in (int(x) for x in args.cameras.split(",")):
            r = run(lm, n, args.seconds, args.fps, args.memory_fps, args.seed)
            print(
                f"{n} | {r['sampled']} / {r['absorbed']} / {r['dropped']} | "
                f"{ms(r['single'], 50):.1f} / {ms(r['single'], 99):.1f} ms ({len(r['single'])}) | "
                f"{ms(r['multi'], 50):.1f} / {ms(r['multi'], 99):.1f} ms ({len(r['multi'])}) | "
                f"{r['lag_p95']:.2f} s | 1",
                flush=True,
            )


if __name__ == "__main__":
    main()
