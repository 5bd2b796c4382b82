"""Flash Memory benchmark: per-update time and memory bytes vs stream length, bounded vs
unbounded feature bank, and how often the bounded bank changes DAM's picks.

    python benchmarks/bench_memory.py                  # CPU: reduced feature sizes, a few minutes
    python benchmarks/bench_memory.py --device cuda    # GPU: Qwen2-VL-7B sizes (16:9 frame)
    python benchmarks/bench_memory.py --quick          # fewer repetitions, shorter agreement stream

Per-update time = median wall time of single-frame updates (one new frame, snapshot included)
taken after the memory has absorbed N frames. The memory is brought to N frames with batch
updates, which give exactly the memory that N single-frame updates give (docs/memory.md).
On CUDA the bounded memory is timed with CUDA graphs (the default) and without, side by side,
and the update at 10,000 frames is broken down into its parts (validation, absorbing the frame,
publishing the snapshot) and the GPU time of the graph replays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fvs_ros.memory import FlashMemory, MemoryConfig  # noqa: E402

LENGTHS = (10, 100, 1_000, 10_000)
MB = 2**20
PARTS = ("_checked", "_absorb_all", "_publish")  # FlashMemory.update = these three, in this order


class SceneStream:
    """Synthetic ViT-like features: scenes (revisited), slow drift, per-frame noise, short events."""

    def __init__(
        self,
        nl: int,
        nf: int,
        c: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        noise: float = 0.3,
        drift: float = 0.03,
    ):
        self.shape, self.nf, self.dtype, self.device = (nl, c), nf, dtype, device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.scenes = torch.randn(12, nl, c, generator=self.g, device=device)
        self.noise, self.drift = noise, drift
        self.offset = torch.zeros(nl, c, device=device)
        self.scene, self.left, self.t = 0, 0, 0

    def next(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """low [b, Nl, C] float32, full [b, Nf, C] model dtype, stamps [b] (10 fps)."""
        lows = []
        for _ in range(b):
            if self.left == 0:  # new segment: a scene (often a revisit), sometimes a 5-frame event
                event = self.rng.random() < 0.1
                self.scene = int(self.rng.integers(len(self.scenes)))
                self.left = 5 if event else int(self.rng.integers(20, 200))
            self.offset += self.drift * torch.randn(self.shape, generator=self.g, device=self.device)
            lows.append(self.scenes[self.scene] + self.offset)
            self.left -= 1
        low = torch.stack(lows) + self.noise * torch.randn(
            b, *self.shape, generator=self.g, device=self.device
        )
        full = torch.randn(b, self.nf, self.shape[1], generator=self.g, device=self.device).to(self.dtype)
        stamps = (self.t + torch.arange(b, dtype=torch.float64)) / 10.0
        self.t += b
        return low, full, stamps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def grow(mem: FlashMemory, stream: SceneStream, n: int, batch: int = 100) -> None:
    while mem.frames_seen < n:
        mem.update(*stream.next(min(batch, n - mem.frames_seen)))


def time_update(mem: FlashMemory, stream: SceneStream, device: torch.device) -> float:
    low, full, stamps = stream.next(1)
    sync(device)
    t0 = time.perf_counter()
    mem.update(low, full, stamps)
    sync(device)
    return time.perf_counter() - t0


def bounded_rows(
    args, device: torch.device
) -> tuple[dict[int, tuple[float, int]], dict[int, float], int, dict[str, float]]:
    """Grow one bounded memory through the lengths, keep a copy (save/load) at each, then time the
    copies in turn, so that a busy host slows every length alike. On CUDA each length also gets a
    copy without CUDA graphs. Returns {n: (time, bytes)}, {n: time without graphs} (CUDA only),
    the graph replays of the timed copies and the breakdown of the last length's update."""
    stream = SceneStream(args.low_tokens, args.full_tokens, args.channels, args.dtype, device)
    mem, copies = FlashMemory(MemoryConfig(bank_capacity=args.capacity), device), {}
    variants = (True, False) if device.type == "cuda" else (True,)
    with tempfile.TemporaryDirectory() as tmp:
        for n in LENGTHS:
            grow(mem, stream, n)
            mem.save(f"{tmp}/memory.pt")
            for graphs in variants:
                copies[n, graphs] = FlashMemory.load(f"{tmp}/memory.pt", device, cuda_graphs=graphs)
    times = {key: [] for key in copies}
    for _ in range(args.reps + 1):  # the first round warms up (and captures the graphs)
        for key, copy in copies.items():
            times[key].append(time_update(copy, stream, device))
    median = {key: statistics.median(t[1:]) for key, t in times.items()}
    replays = sum(copy.graph_replays for copy in copies.values())
    parts = breakdown(copies[LENGTHS[-1], True], stream, device, args.reps)
    return (
        {n: (median[n, True], copies[n, True].nbytes()) for n in LENGTHS},
        {n: median[n, False] for n in LENGTHS if (n, False) in median},
        replays,
        parts,
    )


def breakdown(mem: FlashMemory, stream: SceneStream, device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds of `reps` one-frame updates and of their parts (each timed between device
    syncs, which the whole update then also includes), and on CUDA the GPU time of the graph
    replays: "graphs" sums the head, tail and finish graphs (CUDA events around each), "graph span"
    runs from the head's start to the finish's end (adds the wait for the host's read of the
    convergence flag). Also "tails": tail replays per frame."""
    times: dict[str, list[float]] = {name: [] for name in ("update", *PARTS, "graphs", "graph span")}
    for name in PARTS:  # instance attributes shadow the methods that update() calls
        setattr(mem, name, host_timed(getattr(mem, name), times[name], device))
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    split = mem._graphs  # private: the SplitStep that the copy captured during the timing rounds
    if split is not None:
        for graph in filter(None, (split._head, split._tail, split._finish)):
            gpu_timed(graph, events)
        spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        gpu_timed(split, spans)
    tails = mem.graph_tail_replays
    for _ in range(reps):
        events.clear()
        times["update"].append(time_update(mem, stream, device))
        if split is not None:
            times["graphs"].append(sum(start.elapsed_time(end) for start, end in events) / 1e3)
            times["graph span"].append(spans[-1][0].elapsed_time(spans[-1][1]) / 1e3)
    for name in PARTS:
        delattr(mem, name)
    median = {name: statistics.median(t) for name, t in times.items() if t}
    median["tails"] = (mem.graph_tail_replays - tails) / reps
    return median


def host_timed(fn, store: list[float], device: torch.device):
    """fn, appending its wall time (between device syncs) to store."""

    def run(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        store.append(time.perf_counter() - t0)
        return out

    return run


def gpu_timed(obj, store: list) -> None:
    """obj.replay, recording a pair of CUDA timing events around each call into store."""
    replay = obj.replay

    def run():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay()
        end.record()
        store.append((start, end))
        return out

    obj.replay = run


def unbounded_rows(args, device: torch.device) -> tuple[dict[int, tuple[float, int] | None], int]:
    """Grow one unbounded memory, timing it at each length. When the full-res bank would not fit,
    full-res features are stored at 1 token a frame and the bytes of the real ones added."""
    per_frame_low = args.low_tokens * args.channels * 4 + 4 + 16
    per_frame_full = args.full_tokens * args.channels * args.elt
    peak = 2.5  # buffers grow by 1.5x: old and new live together while copying
    fits = lambda n, full: peak * n * (per_frame_low + full) < 0.7 * available_bytes(device)  # noqa: E731
    stored_tokens = args.full_tokens if fits(LENGTHS[-1], per_frame_full) else 1
    stream = SceneStream(args.low_tokens, stored_tokens, args.channels, args.dtype, device)
    mem, rows = FlashMemory(MemoryConfig(bank_capacity=None), device), {}
    for n in LENGTHS:
        if not fits(n, stored_tokens * args.channels * args.elt):
            rows[n] = None
            continue
        grow(mem, stream, n)
        t = statistics.median([time_update(mem, stream, device) for _ in range(args.reps + 1)][1:])
        missing = (args.full_tokens - stored_tokens) * args.channels * args.elt * mem.frames_seen
        rows[n] = (t, mem.nbytes() + missing)
    return rows, stored_tokens


def scaling(args, device: torch.device) -> None:
    cfg = MemoryConfig(bank_capacity=args.capacity)
    print(
        f"\n== per-update time and memory bytes vs stream length "
        f"(K={cfg.csm_slots}, DAM={cfg.dam_frames}, bounded bank = {cfg.bank_capacity} frames) =="
    )
    t0 = time.perf_counter()
    bounded, eager, replays, parts = bounded_rows(args, device)
    t1 = time.perf_counter()
    unbounded, stored_tokens = unbounded_rows(args, device)
    print(
        f"  (built and timed in {t1 - t0:.0f} s bounded, {time.perf_counter() - t1:.0f} s unbounded; "
        f"time = median of {args.reps} one-frame updates; bytes = state + current snapshot)"
    )
    guessed = extrapolate(unbounded)
    print(
        f"  {'frames':>8} | {'bounded ms':>10} | {'bounded MB':>10} "
        f"| {'unbounded ms':>12} | {'unbounded MB':>12}"
    )
    for n in LENGTHS:
        bt, bb = bounded[n]
        ut, ub = unbounded[n] or guessed[n]
        mark = "  " if unbounded[n] else " *"
        print(
            f"  {n:>8} | {bt * 1e3:>10.2f} | {bb / MB:>10.1f} | "
            f"{ut * 1e3:>10.2f}{mark} | {ub / MB:>10.1f}{mark}"
        )
    if stored_tokens != args.full_tokens:
        print(
            f"  unbounded: full-res stored at {stored_tokens} "
            "token/frame to fit in memory; its MB include the "
            f"bytes of {args.full_tokens} tokens/frame (exact for the shapes); time barely depends on it"
        )
    if guessed:
        print("  * extrapolated linearly from the largest two measured lengths (would not fit in memory)")
    print(f"  bounded time(10,000) / time(100) = {bounded[10_000][0] / bounded[100][0]:.2f}  (target <= 1.2)")
    print(
        f"  bounded bytes identical at 100, 1,000 and 10,000 frames: "
        f"{bounded[100][1] == bounded[1_000][1] == bounded[10_000][1]}"
    )
    if device.type == "cuda":
        print(
            f"  one-frame update at 10,000 frames: {bounded[10_000][0] * 1e3:.2f} ms  (H100 target <= 2 ms)"
        )
        print_graph_rows(bounded, eager, replays, cfg.bank_capacity)
    print_breakdown(parts, args.reps)


def print_graph_rows(bounded, eager: dict[int, float], replays: int, capacity: int) -> None:
    print(
        f"\n  bounded one-frame update with and without CUDA graphs (graphs replay once the bank is full: "
        f"after {capacity} frames; {replays} frames replayed)"
    )
    print(f"  {'frames':>8} | {'graphs ms':>9} | {'eager ms':>8} | {'eager / graphs':>14}")
    for n in LENGTHS:
        on, off = bounded[n][0], eager[n]
        print(f"  {n:>8} | {on * 1e3:>9.2f} | {off * 1e3:>8.2f} | {off / on:>14.2f}")


def print_breakdown(parts: dict[str, float], reps: int) -> None:
    print(
        f"\n  bounded one-frame update at {LENGTHS[-1]:,} frames by part (median of {reps}; each part timed "
        f"between device syncs)"
    )
    for name, what in (
        ("_checked", "input validation (NaN check: one sync)"),
        ("_absorb_all", "absorbing the frame (graph replays once the bank is full)"),
        ("_publish", "the snapshot (one copy each way, DAM choice on the host)"),
    ):
        print(f"    {name:<12} {parts[name] * 1e3:6.2f} ms  {what}")
    print(f"    {'update':<12} {parts['update'] * 1e3:6.2f} ms  (with the syncs between parts)")
    if "graphs" in parts:
        print(
            f"    graphs' GPU time {parts['graphs'] * 1e3:.3f} ms "
            "(head + tail + finish), head start to finish end "
            f"{parts['graph span'] * 1e3:.3f} ms; tail replays per frame {parts['tails']:.2f}"
        )


def extrapolate(rows) -> dict[int, tuple[float, float]]:
    measured = [n for n in LENGTHS if rows[n]]
    if len(measured) < 2 or len(measured) == len(LENGTHS):
        return {}
    (n0, (t0, b0)), (n1, (t1, b1)) = [(n, rows[n]) for n in measured[-2:]]
    return {
        n: (t1 + (t1 - t0) * (n - n1) / (n1 - n0), b1 + (b1 - b0) * (n - n1) / (n1 - n0))
        for n in LENGTHS
        if not rows[n]
    }


def agreement(args, device: torch.device) -> None:
    print(
        f"\n== bounded vs unbounded DAM picks ({args.agree_frames}-frame synthetic stream, compared after "
        f"every {args.agree_step} frames from frame 100) =="
    )
    print("  differ: share of the unbounded (official) DAM frames that the bounded memory does not pick;")
    print("  farther: how much farther (low-res distance) the heaviest centroids are from the frames DAM")
    print("  picked, bounded vs unbounded (0% = equally close)")
    capacities = [args.capacity, 2 * args.capacity]
    for regime, noise, drift in (("noisy scenes", 0.3, 0.03), ("smooth drift", 0.05, 0.03)):
        mems = {cap: FlashMemory(MemoryConfig(bank_capacity=cap), device) for cap in (*capacities, None)}
        stream = SceneStream(
            args.low_tokens, 1, args.channels, torch.float16, device, seed=1, noise=noise, drift=drift
        )
        lows, updates_differing = [], {c: 0 for c in capacities}
        differ, farther = {c: [] for c in capacities}, {c: [] for c in capacities}
        for i in range(0, args.agree_frames, args.agree_step):
            low, full, stamps = stream.next(args.agree_step)
            lows.append(low.flatten(1))
            snaps = {cap: mem.update(low, full, stamps) for cap, mem in mems.items()}
            if i < 100:
                continue
            frames = torch.cat(lows)
            ref = snaps[None]
            ref_cost = dam_cost(ref, frames)
            for cap in capacities:
                got, want = set(snaps[cap].dam_slots.tolist()), set(ref.dam_slots.tolist())
                differ[cap].append(len(want - got) / len(want))
                updates_differing[cap] += got != want
                farther[cap].append(dam_cost(snaps[cap], frames) / ref_cost - 1)
        print(f"  {regime}:")
        for cap in capacities:
            print(
                f"    bank {cap:>4} frames: differ {100 * np.mean(differ[cap]):5.1f}% of frames, "
                f"{100 * updates_differing[cap] / len(differ[cap]):5.1f}% of updates; "
                f"farther {100 * np.mean(farther[cap]):5.2f}% mean, {100 * np.max(farther[cap]):5.2f}% worst"
            )
        del mems


def dam_cost(snap, frames: torch.Tensor) -> float:
    """Mean distance from the heaviest centroids to their nearest DAM frame (low-res)."""
    order = np.lexsort((-snap.csm_times.numpy(), -snap.csm_weights.numpy()))[: len(snap.dam_slots)]
    heavy = snap.csm_features.flatten(1)[torch.from_numpy(order).to(frames.device)]
    picked = frames[snap.dam_slots.to(frames.device)]
    return float(torch.cdist(heavy.double(), picked.double()).min(1).values.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and a shorter agreement stream")
    p.add_argument("--full-size", action="store_true", help="Qwen2-VL-7B feature sizes on the CPU too")
    p.add_argument("--low-tokens", type=int, default=240, help="low-res tokens per frame (pre-merger)")
    p.add_argument("--full-tokens", type=int, default=960, help="full-res tokens per frame (pre-merger)")
    p.add_argument("--channels", type=int, help="feature width (default 1280; CPU 16)")
    p.add_argument("--dtype", default=None, help="full-res dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--capacity", type=int, default=MemoryConfig().bank_capacity, help="bounded bank frames")
    p.add_argument("--reps", type=int, help="timed single-frame updates per length")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the memory's ops are small, threads only add overhead)",
    )
    args = p.parse_args()

    device = torch.device(args.device)
    reduced = device.type == "cpu" and not args.full_size
    args.channels = args.channels or (16 if reduced else 1280)
    args.dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    args.elt = torch.empty((), dtype=args.dtype).element_size()
    args.reps = args.reps or (5 if args.quick else 20)
    args.agree_frames = 1000 if args.quick else 2000
    args.agree_step = 10
    torch.set_num_threads(args.threads)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"Flash Memory benchmark on {name}, torch {torch.__version__}")
    print(
        f"features per frame: low-res {args.low_tokens}x{args.channels} (float32 in memory), "
        f"full-res {args.full_tokens}x{args.channels} {str(args.dtype).removeprefix('torch.')}"
        + (
            "\n  [channels reduced for the CPU; Qwen2-VL-7B on "
            "a 16:9 frame is 240x1280 / 960x1280: --full-size]"
            if reduced
            else ""
        )
    )
    scaling(args, device)
    agreement(args, device)


if __name__ == "__main__":
    main()
