"""Multimodal (t, h, w) position ids of the memory tokens, as the checkpoint was trained with.

Layout inside <|vision_start|> ... <|vision_end|>: the D' DAM frames (full-resolution merged
grid hm x wm, row-major) then the K' CSM slots (low-resolution merged grid hm/2 x wm/2).
With V0 the position of the first memory token and D = D' * hm * wm (official offline rule,
AM-RoPE of FlashMemory.calc_am_rope):

    DAM frame from slot s, grid cell (r, c):  (V0 + tau(s),         V0 + r,     V0 + c)
    CSM slot with time x,  grid cell (r, c):  (V0 + D + tau(x),     V0 + D + r, V0 + D + c)

Text after the memory continues from the largest position the *plain* Qwen2-VL rule gives the
last block (CSM as a K' x hm/2 x wm/2 video starting at V0 + D), plus one:

    <|vision_end|> at V0 + D + max(K' - 1, hm/2 - 1, wm/2 - 1) + 1

so a memory time id may exceed the next text position; training saw exactly that.

tau maps stream time (slot units) into the range of slot indices the checkpoint was trained on
(offline: at most 240 frames = 120 slots sampled uniformly over the video): with N slots seen
and S trained slots, tau(x) = round(x * min(1, (S - 1) / (N - 1))), round half to even like
the official `tensor.round()`. Up to S slots, tau is the official rounding of slot times; past
S the whole stream is compressed linearly into [0, S - 1], as uniform sampling of a longer
video would place it.
"""

from __future__ import annotations

import torch

TRAINED_SLOTS = 120  # official training/evaluation: max_frames 240, two frames per slot


def time_to_position(
    times: torch.Tensor, slots_seen: int, trained_slots: int = TRAINED_SLOTS
) -> torch.Tensor:
    """Slot-unit times [n] -> integer temporal offsets [n] inside [0, trained_slots - 1]."""
    scale = min(1.0, (trained_slots - 1) / max(slots_seen - 1, 1))
    return torch.round(times.to(torch.float64) * scale).long()


def grid_positions(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Temporal offsets [n] of n frames of an h x w grid -> (t, row, col) ids [3, n * h * w], row-major."""
    n = t.numel()
    t_ids = t.view(n, 1, 1).expand(n, h, w)
    h_ids = torch.arange(h, device=t.device).view(1, h, 1).expand(n, h, w)
    w_ids = torch.arange(w, device=t.device).view(1, 1, w).expand(n, h, w)
    return torch.stack([t_ids, h_ids, w_ids]).reshape(3, -1)


def memory_positions(
    start: int, dam_t: torch.Tensor, csm_t: torch.Tensor, merged_hw: tuple[int, int]
) -> tuple[torch.Tensor, int]:
    """Position ids [3, M] of the memory tokens starting at position `start`, and the <|vision_end|> position.

    dam_t [D'] and csm_t [K'] are temporal offsets (see time_to_position); merged_hw is the
    full-resolution merged grid (hm, wm); CSM tokens use (hm/2, wm/2).
    """
    hm, wm = merged_hw
    hl, wl = hm // 2, wm // 2
    dam = grid_positions(dam_t, hm, wm) + start
    csm_start = start + dam_t.numel() * hm * wm
    csm = grid_positions(csm_t, hl, wl) + csm_start
    if csm_t.numel():
        last_plain = csm_start + max(csm_t.numel() - 1, hl - 1, wl - 1)
    elif dam_t.numel():
        last_plain = start + max(dam_t.numel() - 1, hm - 1, wm - 1)
    else:
        last_plain = start - 1
    return torch.cat([dam, csm], dim=1), last_plain + 1
