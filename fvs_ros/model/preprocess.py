"""Frames -> Qwen2-VL pixel patches at full and low resolution, as the official processor makes them.

A frame is resized so both sides are multiples of 56 (patch 14 x merge 2 x low-res pool 2)
within a pixel budget (PIL bicubic, as the transformers 4.45 processor), rescaled to [0, 1] and
normalized with the CLIP mean/std. Two frames form one temporal patch, i.e. one memory slot:
in streaming one frame is used twice, offline two consecutive frames are paired.

Patches are flattened in Qwen2-VL's order: for each temporal patch, 2x2 merge windows in
row-major order, the 4 patches of a window row-major, each patch as (channel, time, y, x).
The low-resolution copy averages 2x2 pixels of the normalized frames and patchifies the result,
which is exactly the official pooling of raw pixel patches before `patch_embed`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
LOW_RES_POOL = 2
SIZE_FACTOR = PATCH * MERGE * LOW_RES_POOL  # 56
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 4 * 224 * 224  # official evaluation video budget
MIN_PIXELS = 32 * 28 * 28


@dataclass(frozen=True)
class SlotPatches:
    """Pixel patches of S slots; each patch row is 3 * 2 * 14 * 14 values."""

    full: torch.Tensor  # [S * h * w, 1176] float32
    low: torch.Tensor  # [S * h/2 * w/2, 1176] float32
    full_hw: tuple[int, int]  # (h, w) patch grid of one full-resolution slot
    low_hw: tuple[int, int]  # (h/2, w/2)


def frame_size(
    height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Resize target (H, W): multiples of 56 near the input aspect ratio, H * W within the budget."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio above 200: {height}x{width}")
    h = max(SIZE_FACTOR, round(height / SIZE_FACTOR) * SIZE_FACTOR)
    w = max(SIZE_FACTOR, round(width / SIZE_FACTOR) * SIZE_FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(SIZE_FACTOR, math.floor(height / beta / SIZE_FACTOR) * SIZE_FACTOR)
        w = max(SIZE_FACTOR, math.floor(width / beta / SIZE_FACTOR) * SIZE_FACTOR)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / SIZE_FACTOR) * SIZE_FACTOR
        w = math.ceil(width * beta / SIZE_FACTOR) * SIZE_FACTOR
    return h, w


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, size[0], size[1], 3] uint8 with PIL bicubic (no-op at the right size)."""
    if frames.shape[1:3] == tuple(size):
        return frames
    height, width = size
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [T, 3, H, W] float32: x / 255 (in float64, as the processor), CLIP mean/std."""
    x = (frames.to(torch.float64) * (1 / 255)).to(torch.float32).permute(0, 3, 1, 2)
    mean, std = _clip_stats(x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std as [1, 3, 1, 1] float32 on `device`, made once: normalize() then copies
    nothing from the host, so it can run inside a CUDA graph capture."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def patchify(images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """[T, 3, H, W] (T even) -> ([T/2 * h * w, 3 * 2 * 14 * 14], (h, w)) in Qwen2-VL patch order."""
    t, c, height, width = images.shape
    h, w = height // PATCH, width // PATCH
    x = images.reshape(
        t // TEMPORAL_PATCH, TEMPORAL_PATCH, c, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t', h/2, w/2, 2, 2, c, 2, 14, 14]
    return x.reshape(-1, c * TEMPORAL_PATCH * PATCH * PATCH), (h, w)


def slot_patches(frames: torch.Tensor, frames_per_slot: int) -> SlotPatches:
    """[B, H, W, 3] uint8 frames (already resized) -> full- and low-resolution patches of B / frames_per_slot
    slots."""
    if frames_per_slot not in (1, 2) or frames.shape[0] % frames_per_slot:
        raise ValueError(f"{frames.shape[0]} frames do not form slots of {frames_per_slot} frame(s)")
    images = normalize(frames)  # [B, 3, H, W]
    if frames_per_slot == 1:
        t, c, height, width = images.shape  # one frame fills both temporal halves (no host sync: graph-safe)
        images = images[:, None].expand(t, TEMPORAL_PATCH, c, height, width).reshape(-1, c, height, width)
    full, full_hw = patchify(images)
    low, low_hw = patchify(F.avg_pool2d(images, LOW_RES_POOL))
    return SlotPatches(full, low, full_hw, low_hw)
