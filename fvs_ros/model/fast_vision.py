"""Fast ViT for streaming frames: Qwen2-VL's vision tower with packed attention and CUDA graphs.

Eager transformers runs the 32-block ViT launch-bound: ~25 launches a block, and its SDPA path
loops over the sequences (each slot is two: full and low resolution). On an H100 one frame took
20-30 ms against ~3 ms of math (benchmarks/gpu_notes.md). This module runs the *same*
transformers modules (patch_embed, rotary_pos_emb, blocks) with

- one attention call per block for all sequences: an attention function registered with
  transformers' AttentionInterface under a name containing "flash", so VisionAttention hands it
  the packed layout (cu_seqlens); on CUDA in 16-bit it is FlashAttention-2 varlen, elsewhere an
  SDPA call per sequence (the reference path the CPU tests run);
- positions and sequence bounds computed once per (batch, frame size) outside the forward, so
  the forward from uint8 frames (normalisation, patchify, 2x2 pooling: preprocess.slot_patches)
  to pre-merger features has no host synchronisation;
- on CUDA, one captured graph per batch bucket (1, 2, 4, 8, 16 slots by default) and slot
  layout: a batch is padded up to its bucket; padding slots are sequences of their own, so they
  change nothing.

Slots of one frame (the frame in both halves of the temporal patch) or of two consecutive frames
(the trained layout: one temporal patch of two different frames); Qwen2-VL only, VideoLM keeps
the eager tower for Qwen2.5-VL.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from fvs_ros.common.cuda_graph import capture

from .fast_decode import flash_available, flash_varlen
from .preprocess import slot_patches

log = logging.getLogger(__name__)

ATTN_NAME = "fvs_vision_flash_varlen"  # "flash" in the name: VisionAttention passes cu_seqlens
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def _packed_attention(
    module,
    query,
    key,
    value,
    attention_mask=None,
    dropout=0.0,
    scaling=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """Bidirectional attention within each packed sequence: q/k/v [1, H, L, D] -> [1, L, H, D]."""
    if flash_available(query.device, query.dtype):
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [L, H, D]
        out, _ = flash_varlen(
            q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, False, scaling
        )
        return out[None], None
    bounds = cu_seq_lens_q.tolist()
    outs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scaling)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, _packed_attention)


@dataclass(frozen=True)
class _Layout:
    """What the forward needs besides the pixels, for B slots of one frame size."""

    grid: torch.Tensor  # [2, 3]: (B, h, w) full and (B, h/2, w/2) low resolution (B slots)
    position_ids: torch.Tensor  # [B * (Nf + Nl), 2] (h, w) rotary positions
    cu_seqlens: torch.Tensor  # [2B + 1] int32
    max_seqlen: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor  # static input [bucket * frames_per_slot, H, W, 3] uint8
    full: torch.Tensor  # static outputs [bucket, Nf, C]
    low: torch.Tensor  # [bucket, Nl, C]


class FastVision:
    """Pre-merger ViT features of streamed slots: encode(frames [B, H, W, 3] uint8, frames_per_slot) ->
    (full, low, hw)."""

    def __init__(self, visual, graphs: bool | None = None, buckets=DEFAULT_BUCKETS):
        self.visual = visual
        self.device = visual.get_device()
        self.dtype = visual.get_dtype()
        self.merge = visual.spatial_merge_size
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        visual.config._attn_implementation = ATTN_NAME
        self._layouts: dict[tuple[int, int, int], _Layout] = {}  # (slots, H, W)
        self._graphs: dict[tuple, _Graph | None] = {}  # (slots, H, W, frames_per_slot); None: capture failed
        self._pool = None
        self._lock = threading.Lock()
        self.graph_replays = 0

    @torch.inference_mode()
    def encode(
        self, frames: torch.Tensor, frames_per_slot: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """[B, H, W, 3] uint8 frames on the device (H, W multiples of 56) -> features of
        S = B / frames_per_slot slots (full [S, Nf, C], low [S, Nl, C], full (h, w) grid, low grid);
        frames_per_slot 2 pairs consecutive frames. Outputs are the caller's (never overwritten by
        a later call)."""
        b, height, width, _ = frames.shape
        if frames_per_slot not in (1, 2) or b % frames_per_slot:
            raise ValueError(f"{b} frames do not form slots of {frames_per_slot} frame(s)")
        slots = b // frames_per_slot
        hw = (height // 14, width // 14)
        low_hw = (hw[0] // 2, hw[1] // 2)
        with self._lock:
            graph = self._graph(slots, height, width, frames_per_slot) if self.graphs else None
            if graph is None:
                full, low = self._forward(frames, frames_per_slot)
                return full, low, hw, low_hw
            graph.frames[:b].copy_(frames)
            graph.graph.replay()
            self.graph_replays += 1
            return graph.full[:slots].clone(), graph.low[:slots].clone(), hw, low_hw

    def prepare(self, height: int, width: int, frames_per_slot: int = 1) -> None:
        """Capture the graphs of every bucket for slots of this size and layout now (else on first use)."""
        if self.graphs:
            with self._lock, torch.inference_mode():
                for bucket in self.buckets:
                    self._graph(bucket, height, width, frames_per_slot)

    def _forward(self, frames: torch.Tensor, frames_per_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device ops only (graph-safe once the layout is cached): uint8 frames -> (full, low) features."""
        b = frames.shape[0] // frames_per_slot
        layout = self._layout(b, frames.shape[1], frames.shape[2])
        patches = slot_patches(frames, frames_per_slot)
        pixels = torch.cat([patches.full, patches.low]).to(self.dtype)
        hidden = self.visual.patch_embed(pixels)  # [B * (Nf + Nl), C]
        rotary = self.visual.rotary_pos_emb(hidden, layout.position_ids)
        for block in self.visual.blocks:
            hidden = block(
                hidden, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, position_embeddings=rotary
            )
        full, low = hidden.split([patches.full.shape[0], patches.low.shape[0]])
        return full.view(b, -1, hidden.shape[-1]), low.view(b, -1, hidden.shape[-1])

    def _layout(self, b: int, height: int, width: int) -> _Layout:
        key = (b, height, width)
        if key not in self._layouts:
            h, w = height // 14, width // 14
            grid = torch.tensor([[b, h, w], [b, h // 2, w // 2]], device=self.device)
            cu = get_vision_cu_seqlens(grid)
            self._layouts[key] = _Layout(
                grid, get_vision_position_ids(grid, self.merge), cu, int((cu[1:] - cu[:-1]).max())
            )
        return self._layouts[key]

    def _graph(self, b: int, height: int, width: int, frames_per_slot: int) -> _Graph | None:
        """The graph of the smallest bucket holding b slots of this size and layout (captured on first
        use)."""
        bucket = next((n for n in self.buckets if n >= b), None)
        if bucket is None:
            return None
        key = (bucket, height, width, frames_per_slot)
        if key not in self._graphs:
            n = bucket * frames_per_slot
            frames = torch.zeros(n, height, width, 3, dtype=torch.uint8, device=self.device)
            self._layout(bucket, height, width)
            try:
                graph, (full, low) = capture(
                    lambda: self._forward(frames, frames_per_slot), self.device, self._pool
                )
            except Exception as e:  # noqa: BLE001 - eager stays correct, only slower
                log.warning(
                    "ViT graph capture failed for %d slots of %d x %dx%d frames (running eagerly): %s",
                    bucket,
                    frames_per_slot,
                    height,
                    width,
                    e,
                )
                self._graphs[key] = None
                return None
            self._pool = self._pool or graph.pool()
            self._graphs[key] = _Graph(graph, frames, full, low)
        return self._graphs[key]
