"""How much of the [system + memory] prefix changes per memory update (decides incremental rebuilds).

A rebuild could start at the first prefix token that changed (the KV before it stays valid) if
that token sat late in the prefix. This streams real video frames, one memory slot per frame,
through the tiny random ViT (real pixels, real k-means: the memory's own update) and compares
each update's prefix inputs (merged embeddings and (t, h, w) positions) with the previous ones.

    python benchmarks/prefix_change.py [--video PATH] [--frames N] [--csm 60 --dam 30]

Prints, per update, where the first changed token sits (as a fraction of the prefix: 1.0 = the
whole prefix must be recomputed) and how many tokens changed, before and after the memory has
seen more slots than the checkpoint was trained on (TRAINED_SLOTS = 120: past it every temporal
position is rescaled).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fvs_ros.memory import FlashMemory, MemoryConfig  # noqa: E402
from fvs_ros.model import load_model  # noqa: E402
from fvs_ros.model.positions import TRAINED_SLOTS  # noqa: E402
from fvs_ros.model.tiny import write_tiny_checkpoint  # noqa: E402

VIDEOS = Path("/work/shared/data/videos")


def read_frames(path: Path, limit: int) -> np.ndarray:
    cap, out = cv2.VideoCapture(str(path)), []
    while len(out) < limit:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not out:
        raise SystemExit(f"no frames in {path}")
    return np.stack(out)


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=VIDEOS / "sam2_cups.mp4")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--csm", type=int, default=60)
    p.add_argument("--dam", type=int, default=30)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(write_tiny_checkpoint(Path(tmp) / "tiny", "flash_vstream"))
    frames = read_frames(args.video, args.frames)
    memory = FlashMemory(MemoryConfig(csm_slots=args.csm, dam_frames=args.dam))
    prev = None
    rows = []  # (slots seen, first changed fraction, changed fraction, prefix tokens)
    for i, frame in enumerate(frames):
        feats = lm.encode_frames(frame[None])
        snap = memory.update(
            feats.low, feats.full, torch.tensor([float(i)], dtype=torch.float64), feats.full_hw
        )
        embeds, positions, _ = lm.memory_inputs(snap, 0)
        cur = (embeds.float(), positions)
        if prev is not None and prev[0].shape == cur[0].shape:
            same = (prev[0] == cur[0]).all(-1) & (prev[1] == cur[1]).all(0)
            n = same.numel()
            changed = (~same).nonzero()
            first = int(changed[0]) if len(changed) else n
            rows.append((snap.frames_seen, (n - first) / n, float((~same).float().mean()), n))
        prev = cur
    print(f"video {args.video.name}: {len(frames)} frames, memory {args.csm} CSM + {args.dam} DAM")
    for name, sel in (
        (f"<= {TRAINED_SLOTS} slots seen", [r for r in rows if r[0] <= TRAINED_SLOTS]),
        (f"> {TRAINED_SLOTS} slots seen", [r for r in rows if r[0] > TRAINED_SLOTS]),
        ("all (memory full)", [r for r in rows if r[0] > args.csm]),
    ):
        if not sel:
            continue
        tail, frac = [r[1] for r in sel], [r[2] for r in sel]
        print(
            f"{name:22s} updates {len(sel):4d}  memory tokens {sel[-1][3]:6d}  "
            f"recompute from first change p10/p50/p90 "
            f"{pct(tail, 10):.3f}/{pct(tail, 50):.3f}/{pct(tail, 90):.3f}"
            f"  tokens changed p50 {pct(frac, 50):.3f}  updates with <= 25% to recompute "
            f"{sum(t <= 0.25 for t in tail) / len(tail):.2f}"
        )


if __name__ == "__main__":
    main()
