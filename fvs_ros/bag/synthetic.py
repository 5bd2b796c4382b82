"""Synthetic scenes with known content: a smoke-test bag and question file without any real video.

    python -m fvs_ros.bag.synthetic OUT.mcap [--questions OUT.jsonl] [--fps 5] [--scene-s 2] [--compressed]

Three scenes, each `scene_s` seconds long: a red background with a white square moving left to
right, a green background with a yellow disc moving down, a blue background with white stripes.
Every frame differs from the previous one (the shape moves). Used by the tests and as a first
run of the evaluation pipeline (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from fvs_ros.bag.bagio import ImageBagWriter
from fvs_ros.bag.convert import DEFAULT_START_STAMP

# name, background RGB, what is drawn
SCENES = (
    ("red", (200, 30, 30), "a white square moving from left to right"),
    ("green", (30, 170, 60), "a yellow disc moving down"),
    ("blue", (30, 60, 200), "white horizontal stripes"),
)


def scene_frame(scene: int, phase: float, height: int = 112, width: int = 168) -> np.ndarray:
    """Frame of `scene` (0..2) at `phase` in [0, 1) of the scene: RGB uint8 HxWx3."""
    name, bg, _ = SCENES[scene]
    img = np.empty((height, width, 3), np.uint8)
    img[:] = bg
    s = max(8, height // 4)
    if name == "red":
        x = int(phase * (width - s))
        img[height // 2 - s // 2 : height // 2 + s // 2, x : x + s] = 255
    elif name == "green":
        y = int(s // 2 + phase * (height - s))
        cv2.circle(img, (width // 2, y), s // 2, (240, 220, 40), -1)
    else:
        off = int(phase * 8)
        for y in range(off, height, 16):
            img[y : y + 4] = 255
    return img


def scene_frames(fps: float = 5.0, scene_s: float = 2.0, height: int = 112, width: int = 168):
    """Yield (stream time s, scene index, RGB frame) for the three scenes in order."""
    n = int(round(fps * scene_s))
    for scene in range(len(SCENES)):
        for i in range(n):
            yield (scene * n + i) / fps, scene, scene_frame(scene, i / n, height, width)


def scene_at(t: float, scene_s: float = 2.0) -> int:
    return min(int(t // scene_s), len(SCENES) - 1)


def write_scene_bag(
    out,
    *,
    fps: float = 5.0,
    scene_s: float = 2.0,
    compressed=None,
    topic=None,
    storage: str = "mcap",
    start_stamp: float = DEFAULT_START_STAMP,
    height: int = 112,
    width: int = 168,
    overwrite: bool = False,
) -> list[tuple[float, int, np.ndarray]]:
    """Write the scenes to a bag; returns the frames written (stream time, scene, RGB)."""
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    frames = list(scene_frames(fps, scene_s, height, width))
    with ImageBagWriter(out, topic=topic, compressed=compressed, storage=storage, overwrite=overwrite) as w:
        for t, _, rgb in frames:
            w.write(rgb, start_stamp + t)
    return frames


def scene_questions(scene_s: float = 2.0) -> list[dict]:
    """Questions whose reference answers follow from the scenes (a random model gets some right by chance)."""
    names = [n for n, _, _ in SCENES]
    qs = []
    for k, (name, _, _shape) in enumerate(SCENES):
        t = round((k + 0.5) * scene_s, 3)
        qs.append(
            {
                "id": f"colour_{name}",
                "time": t,
                "question": "What colour is the background now?",
                "choices": names,
                "answer": name,
            }
        )
    qs.append(
        {
            "id": "count_scenes",
            "time": "end",
            "question": "How many different background colours were shown?",
            "answer": str(len(SCENES)),
        }
    )
    qs.append(
        {
            "id": "describe",
            "time": "end",
            "question": "Describe what happened in the video.",
            "answer": "The background was red with a moving white square, then green with a yellow disc, "
            "then blue with white stripes.",
        }
    )
    return qs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fvs_ros.bag.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out", help="OUT.mcap / OUT.db3 or a bag directory")
    p.add_argument("--questions", help="also write a matching JSONL question file here")
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--scene-s", type=float, default=2.0, help="seconds per scene")
    p.add_argument("--compressed", nargs="?", const="jpeg", choices=("jpeg", "png"))
    p.add_argument("--size", default="168x112", help="WxH")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    frames = write_scene_bag(
        args.out,
        fps=args.fps,
        scene_s=args.scene_s,
        compressed=args.compressed,
        height=h,
        width=w,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(frames)} frames ({frames[-1][0]:.2f} s) to {args.out}", file=sys.stderr)
    if args.questions:
        Path(args.questions).write_text("".join(json.dumps(q) + "\n" for q in scene_questions(args.scene_s)))
        print(f"wrote questions to {args.questions}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
