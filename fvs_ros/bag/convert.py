"""Convert a video file or an image folder into a rosbag2 bag of camera frames.

    python -m fvs_ros.bag.convert VIDEO_OR_DIR OUT.mcap [--fps 2] [--compressed [jpeg|png]]

OUT ending in .mcap (or .db3) is one self-contained storage file (plays with `ros2 bag play OUT.mcap`);
any other OUT is a rosbag2 directory (metadata.yaml + storage file, --storage mcap|sqlite3).

Frames are taken from the video on a regular grid of --fps (default: every frame): for output
frame k the source frame nearest to k/fps seconds. Header stamp = log time =
--start-stamp + the source frame's video time (minus --start), so stream time 0 is the first frame
written and video time T is stream time T - start. Image folders: files sorted in natural order
(img2 < img10), one frame every 1/fps seconds (default 1 fps).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from fvs_ros.bag.bagio import BagError, ImageBagWriter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_START_STAMP = (
    1_700_000_000.0  # 2023-11-14T22:13:20Z: a fixed, non-zero epoch (zero reads as "unset" to ROS time)
)


class ConvertError(RuntimeError):
    pass


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _fit(rgb: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    if not max_side or max(rgb.shape[:2]) <= max_side:
        return rgb
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def video_frames(
    path: Path, fps: Optional[float] = None, start: float = 0.0, end: Optional[float] = None
) -> Iterator[tuple[np.ndarray, float, int]]:
    """Yield (RGB frame, video time s, source frame index) on a grid of `fps` within [start, end]."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ConvertError(f"cannot open video {str(path)!r} with OpenCV")
    try:
        src_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if src_fps <= 0:
            raise ConvertError(f"video {str(path)!r} reports no frame rate")
        if fps is not None and fps > src_fps + 1e-9:
            print(
                f"[convert] --fps {fps} is above the video's {src_fps:.3f} fps; using every frame",
                file=sys.stderr,
            )
            fps = None
        k, i = 0, 0  # next grid index, source frame index
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            t = i / src_fps
            if end is not None and t > end + 1e-9:
                return
            half = 0.5 / src_fps
            if fps is None:
                take = t >= start - 1e-9
            else:  # the first frame within half a source period of the grid time is the nearest one
                take = t >= start + k / fps - half - 1e-9
                if take:
                    while start + k / fps <= t + half + 1e-9:  # grid times this frame is nearest to
                        k += 1
            if take:
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t, i
            i += 1
    finally:
        cap.release()


def folder_frames(path: Path, fps: float) -> Iterator[tuple[np.ndarray, float, str]]:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise ConvertError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(path)!r}")
    for k, f in enumerate(files):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            raise ConvertError(f"cannot read image {str(f)!r}")
        yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB), k / fps, f.name


def convert(
    src,
    out,
    *,
    fps: Optional[float] = None,
    compressed: Optional[str] = None,
    topic: Optional[str] = None,
    frame_id: str = "camera",
    storage: str = "mcap",
    start: float = 0.0,
    end: Optional[float] = None,
    start_stamp: float = DEFAULT_START_STAMP,
    max_side: Optional[int] = None,
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> dict:
    """Write the bag; returns a summary dict (frames, duration_s, topic, msgtype, path)."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{str(src)!r} does not exist")
    if fps is not None and fps <= 0:
        raise ConvertError(f"--fps must be > 0, got {fps}")
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    if src.is_dir():
        frames = ((rgb, t) for rgb, t, _ in folder_frames(src, fps or 1.0))
    else:
        frames = ((rgb, t - start) for rgb, t, _ in video_frames(src, fps, start, end))
    n, last = 0, 0.0
    with ImageBagWriter(
        out,
        topic=topic,
        compressed=compressed,
        storage=storage,
        frame_id=frame_id,
        jpeg_quality=jpeg_quality,
        overwrite=overwrite,
    ) as w:
        for rgb, t in frames:
            w.write(_fit(rgb, max_side), start_stamp + max(0.0, t))
            n, last = n + 1, t
            shape = rgb.shape
        if n == 0:
            raise ConvertError(f"no frames taken from {str(src)!r} (check --start/--end)")
    return {
        "path": str(out),
        "frames": n,
        "duration_s": round(last, 6),
        "topic": topic,
        "msgtype": w.msgtype,
        "fps": fps,
        "source_size": f"{shape[1]}x{shape[0]}",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fvs_ros.bag.convert",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("src", metavar="VIDEO_OR_DIR", help="video file readable by OpenCV, or a folder of images")
    p.add_argument("out", metavar="OUT", help="OUT.mcap / OUT.db3 (single file) or a bag directory")
    p.add_argument(
        "--fps", type=float, help="frames per second to write (video default: every frame; folder default: 1)"
    )
    p.add_argument(
        "--compressed",
        nargs="?",
        const="jpeg",
        choices=("jpeg", "png"),
        help="write sensor_msgs/CompressedImage (default jpeg) instead of raw rgb8 sensor_msgs/Image",
    )
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--topic", help="default /camera/image_raw (raw) or /camera/image_raw/compressed")
    p.add_argument("--frame-id", default="camera")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="for bag directories")
    p.add_argument("--start", type=float, default=0.0, help="video time (s) of the first frame to take")
    p.add_argument("--end", type=float, help="video time (s) of the last frame to take")
    p.add_argument(
        "--start-stamp",
        type=float,
        default=DEFAULT_START_STAMP,
        help=f"header stamp (s since epoch) of the first frame (default {DEFAULT_START_STAMP:.0f})",
    )
    p.add_argument("--max-side", type=int, help="downscale so the longer side is at most this many pixels")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = convert(
            args.src,
            args.out,
            fps=args.fps,
            compressed=args.compressed,
            topic=args.topic,
            frame_id=args.frame_id,
            storage=args.storage,
            start=args.start,
            end=args.end,
            start_stamp=args.start_stamp,
            max_side=args.max_side,
            jpeg_quality=args.jpeg_quality,
            overwrite=args.overwrite,
        )
    except (ConvertError, BagError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s['frames']} frames ({s['duration_s']:.2f} s, source {s['source_size']}) as {s['msgtype']} "
        f"on {s['topic']} to {s['path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
