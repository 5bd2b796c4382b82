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
- on CUDA, one captured graph per batch bucket (1, 2, 4, 8, 16 by default): a batch is padded
  up to its bucket; padding frames are sequences of their own, so they change nothing.

Streaming only (one frame per slot, Qwen2-VL); VideoLM keeps the eager tower for the rest.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from fvs_ros.cuda_graph import capture

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

    grid: torch.Tensor  # [2, 3]: (B, h, w) full and (B, h/2, w/2) low resolution
    position_ids: torch.Tensor  # [B * (Nf + Nl), 2] (h, w) rotary positions
    cu_seqlens: torch.Tensor  # [2B + 1] int32
    max_seqlen: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor  # static input [bucket, H, W, 3] uint8
    full: torch.Tensor  # static outputs [bucket, Nf, C]
    low: torch.Tensor  # [bucket, Nl, C]


class FastVision:
    """Pre-merger ViT features of streamed frames: encode(frames [B, H, W, 3] uint8) -> (full, low, hw)."""

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
        self._layouts: dict[tuple[int, int, int], _Layout] = {}
        self._graphs: dict[tuple[int, int, int], _Graph | None] = {}  # None: capture failed, run eagerly
        self._pool = None
        self._lock = threading.Lock()
        self.graph_replays = 0

    @torch.inference_mode()
    def encode(
        self, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """[B, H, W, 3] uint8 frames on the device (H, W multiples of 56) -> (full [B, Nf, C], low [B, Nl, C],
        full (h, w) grid, low grid). Outputs are the caller's (never overwritten by a later call)."""
        b, height, width, _ = frames.shape
        hw = (height // 14, width // 14)
        low_hw = (hw[0] // 2, hw[1] // 2)
        with self._lock:
            graph = self._graph(b, height, width) if self.graphs else None
            if graph is None:
                full, low = self._forward(frames)
                return full, low, hw, low_hw
            graph.frames[:b].copy_(frames)
            graph.graph.replay()
            self.graph_replays += 1
            return graph.full[:b].clone(), graph.low[:b].clone(), hw, low_hw

    def prepare(self, height: int, width: int) -> None:
        """Capture the graphs of every bucket for frames of this size now (else on first use)."""
        if self.graphs:
            with self._lock, torch.inference_mode():
                for bucket in self.buckets:
                    self._graph(bucket, height, width)

    def _forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device ops only (graph-safe once the layout is cached): uint8 frames -> (full, low) features."""
        b = frames.shape[0]
        layout = self._layout(b, frames.shape[1], frames.shape[2])
        patches = slot_patches(frames, 1)
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

    def _graph(self, b: int, height: int, width: int) -> _Graph | None:
        """The graph of the smallest bucket holding b frames of this size (captured on first use)."""
        bucket = next((n for n in self.buckets if n >= b), None)
        if bucket is None:
            return None
        key = (bucket, height, width)
        if key not in self._graphs:
            frames = torch.zeros(bucket, height, width, 3, dtype=torch.uint8, device=self.device)
            self._layout(bucket, height, width)
            try:
                graph, (full, low) = capture(lambda: self._forward(frames), self.device, self._pool)
            except Exception as e:  # noqa: BLE001 - eager stays correct, only slower
                log.warning(
                    "ViT graph capture failed for %d x %dx%d frames (running eagerly): %s",
                    bucket,
                    height,
                    width,
                    e,
                )
                self._graphs[key] = None
                return None
            self._pool = self._pool or graph.pool()
            self._graphs[key] = _Graph(graph, frames, full, low)
        return self._graphs[key]
