"""A picture of what the memory holds: the detail frames and the context timeline.

    view = render_memory_view(snapshot, thumbnails)   # thumbnails: {slot: RGB thumbnail}
    view.image                                         # H x W x 3 uint8 RGB

Top: a mosaic of the DAM (detail) frames in time order, each tile labelled with its stamp
(seconds, as in the images' headers) and its memory slot. Bottom: the CSM (context) timeline
over stream time, first to last frame seen: one bar per centroid at its mean stamp, its height
proportional to its weight (frames absorbed), a line under it across the span of its members;
ticks on the axis mark the detail frames. Pure numpy/OpenCV: no ROS, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
DETAIL = (80, 200, 255)  # tiles' frames, detail ticks
CONTEXT = (255, 170, 60)  # centroid bars and spans
MISSING = (70, 70, 70)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Tile:
    """Where one detail frame is drawn."""

    slot: int
    stamp: float
    label: str
    box: tuple[int, int, int, int]  # x, y, width, height of the image area (label strip below it)


@dataclass(frozen=True)
class MemoryView:
    image: np.ndarray  # H x W x 3 uint8 RGB
    tiles: tuple[Tile, ...]  # in time order
    timeline_box: tuple[int, int, int, int]  # x, y, width, height of the context timeline


def render_memory_view(
    snapshot,
    thumbnails: dict[int, np.ndarray],
    *,
    columns: int = 6,
    tile_width: int = 160,
    timeline_height: int = 90,
) -> MemoryView:
    """The view of `snapshot` (a MemorySnapshot); thumbnails maps memory slots to RGB images
    (frames without one are drawn as grey tiles)."""
    if columns < 1 or tile_width < 16 or timeline_height < 30:
        raise ValueError("columns >= 1, tile_width >= 16 and timeline_height >= 30 are needed")
    order = np.argsort(np.asarray(snapshot.dam_stamps, dtype=np.float64), kind="stable")
    slots = [int(snapshot.dam_slots[i]) for i in order]
    stamps = [float(snapshot.dam_stamps[i]) for i in order]
    tile_h = _tile_height(thumbnails, slots, tile_width)
    label_h, pad = 18, 4
    rows = max(1, -(-len(slots) // columns))
    width = columns * (tile_width + pad) + pad
    mosaic_h = rows * (tile_h + label_h + pad) + pad
    height = mosaic_h + timeline_height + 2 * pad
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    tiles = []
    for i, (slot, stamp) in enumerate(zip(slots, stamps, strict=True)):
        x = pad + (i % columns) * (tile_width + pad)
        y = pad + (i // columns) * (tile_h + label_h + pad)
        thumb = thumbnails.get(slot)
        if thumb is None:
            image[y : y + tile_h, x : x + tile_width] = MISSING
        else:
            image[y : y + tile_h, x : x + tile_width] = cv2.resize(
                thumb, (tile_width, tile_h), interpolation=cv2.INTER_AREA
            )
        label = f"{stamp:.2f} s  #{slot}"
        _text(image, label, x + 2, y + tile_h + label_h - 5, tile_width - 4)
        tiles.append(Tile(slot, stamp, label, (x, y, tile_width, tile_h)))
    if not slots:
        _text(image, "memory is empty", pad + 4, pad + tile_h // 2, width - 2 * pad)
    box = (pad, mosaic_h + pad, width - 2 * pad, timeline_height)
    _timeline(image, snapshot, box, stamps)
    return MemoryView(image, tuple(tiles), box)


def _tile_height(thumbnails: dict[int, np.ndarray], slots: list[int], tile_width: int) -> int:
    """Tiles take the aspect of the first available thumbnail (4:3 without any)."""
    for slot in slots:
        thumb = thumbnails.get(slot)
        if thumb is not None:
            return max(8, round(tile_width * thumb.shape[0] / thumb.shape[1]))
    return tile_width * 3 // 4


def _timeline(image: np.ndarray, snapshot, box, detail_stamps: list[float]) -> None:
    x0, y0, w, h = box
    axis_y = y0 + h - 16
    cv2.line(image, (x0, axis_y), (x0 + w - 1, axis_y), TEXT, 1)
    first, last = snapshot.first_stamp, snapshot.last_stamp
    if first is None:
        _text(image, "context memory: empty", x0, y0 + 14, w)
        return
    span = max(last - first, 1e-9)

    def px(stamp: float) -> int:
        return x0 + int(round((stamp - first) / span * (w - 1)))

    weights = np.asarray(snapshot.csm_weights, dtype=np.float64)
    top = max(float(weights.max()), 1.0) if len(weights) else 1.0
    bar_h = axis_y - y0 - 18
    for i, weight in enumerate(weights):
        lo, hi = (float(v) for v in snapshot.csm_spans[i])
        cv2.line(image, (px(lo), axis_y - 3), (px(hi), axis_y - 3), CONTEXT, 1)
        x = px(float(snapshot.csm_stamps[i]))
        cv2.rectangle(
            image, (x - 1, axis_y - 4 - int(round(bar_h * weight / top))), (x + 1, axis_y - 4), CONTEXT, -1
        )
    for stamp in detail_stamps:
        cv2.line(image, (px(stamp), axis_y + 1), (px(stamp), axis_y + 5), DETAIL, 1)
    _text(image, f"context memory: {len(weights)} centroids, {snapshot.frames_seen} frames", x0, y0 + 12, w)
    _text(image, f"{first:.2f} s", x0, y0 + h - 2, w // 2)
    end = f"{last:.2f} s"
    (tw, _), _ = cv2.getTextSize(end, _FONT, 0.38, 1)
    _text(image, end, x0 + w - tw, y0 + h - 2, tw + 1)


def _text(image: np.ndarray, text: str, x: int, y: int, max_width: int) -> None:
    """Text with its baseline at y, shrunk to fit max_width pixels."""
    scale = 0.38
    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    if tw > max_width > 0:
        scale *= max_width / tw
    cv2.putText(image, text, (x, y), _FONT, scale, TEXT, 1, cv2.LINE_AA)
