"""Small copies of the frames the memory retains, so answers can show their evidence and the
memory view can show what the node remembers.

The memory (fvs_ros.memory) holds ViT features, not pixels. The engine keeps one downscaled RGB
copy per memory slot beside it and drops every copy whose frame the memory's bank no longer
retains (MemorySnapshot.bank_slots): at most bank_capacity thumbnails, whatever the stream length
(120 frames of 16:9 at 160 px: 120 x 160 x 90 x 3 = 5.2 MB).
"""

from __future__ import annotations

import threading
from typing import Iterable

import cv2
import numpy as np

DEFAULT_SIDE = 160  # longest side of a thumbnail in pixels


def thumbnail(frame: np.ndarray, side: int = DEFAULT_SIDE) -> np.ndarray:
    """RGB uint8 HxWx3 -> a copy whose longest side is at most `side` (area filter), contiguous."""
    h, w = frame.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return np.ascontiguousarray(frame).copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """RGB uint8 image -> JPEG bytes."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return data.tobytes()


class ThumbnailStore:
    """Thumbnails by memory slot index; thread-safe (written by the frame worker, read by answers
    and the memory view)."""

    def __init__(self, side: int = DEFAULT_SIDE):
        if side < 8:
            raise ValueError(f"thumbnail side must be >= 8 pixels, got {side}")
        self.side = side
        self._lock = threading.Lock()
        self._images: dict[int, np.ndarray] = {}

    def add(self, slot: int, image: np.ndarray) -> None:
        """Keep `image` (a thumbnail()) for memory slot `slot`."""
        with self._lock:
            self._images[int(slot)] = image

    def retain(self, slots: Iterable[int]) -> None:
        """Drop the thumbnails of every slot not in `slots` (the frames the memory no longer holds)."""
        keep = {int(s) for s in slots}
        with self._lock:
            for slot in [s for s in self._images if s not in keep]:
                del self._images[slot]

    def clear(self) -> None:
        with self._lock:
            self._images.clear()

    def get(self, slot: int) -> np.ndarray | None:
        with self._lock:
            return self._images.get(int(slot))

    def take(self, slots: Iterable[int]) -> dict[int, np.ndarray]:
        """The thumbnails held for `slots` (missing ones left out)."""
        with self._lock:
            return {int(s): self._images[int(s)] for s in slots if int(s) in self._images}

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(image.nbytes for image in self._images.values())
