"""Evidence: how much of an answer's (or a watched condition's) attention went to each memory block.

A memory block is one DAM frame (its full-resolution merged grid) or one CSM centroid (its
low-resolution grid), laid out in the prompt as docs/model.md describes:
[head text][DAM block 0] ... [DAM block D'-1][CSM block 0] ... [CSM block K'-1]<|vision_end|>.

Quantity (the same on every path):

    rows   = every position whose output chose an answer token: the prompt's last token (it
             predicts the first answer token) and each answer token fed back to predict the next
    layers = evidence_layers(): the third quarter of the decoder (layers L/2 .. 3L/4 - 1; 14-20
             of Qwen2-VL-7B's 28). Middle layers are where a VLM's attention to visual tokens
             follows the content asked about; the last layers put most of their mass on a few
             sink tokens (the first text tokens), which says little about the frames.
    mass_b = mean over layers, rows and query heads of the softmax attention probability summed
             over block b's key tokens (causal: a row sees the keys up to itself)

mass sums to the fraction of attention that went to memory at all; an evidence item's share is
mass_b / sum(mass). The query vectors are captured during the answer's own forward passes (the
eager path through a recording SDPA attention function, FastDecoder inside its CUDA graphs);
after the last token the scores against the cached keys are recomputed for the recorded rows
only: a few small matmuls, off the time-to-first-token path.

Watched conditions (conditions.py) get the same quantity with one row each: the last token of
the condition's prompt, whose logits give P(yes), recorded in the same packed forward that gives
the probability (eager: QueryRecorder with the rows of every prompt's end; FastDecoder: in
packed_logits). In that forward a row sees the prefix and its own prompt only (the block mask),
so its mass is that of the condition asked alone (block_attention with `visible`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

RECORDING_SDPA = "fvs_recording_sdpa"
_SCORES_PER_CHUNK = 1 << 25  # float32 attention scores computed at once (128 MB)

_local = threading.local()  # .recorder: the QueryRecorder of the answer running on this thread


@dataclass(frozen=True)
class MemoryLayout:
    """Where the memory blocks lie in the prompt (token indices = KV-cache slots)."""

    start: int  # index of the first memory token (the number of head tokens)
    dam_blocks: int
    dam_tokens: int  # LLM tokens per DAM frame
    csm_blocks: int
    csm_tokens: int  # LLM tokens per CSM centroid

    @property
    def num_blocks(self) -> int:
        return self.dam_blocks + self.csm_blocks

    @property
    def num_tokens(self) -> int:
        return self.dam_blocks * self.dam_tokens + self.csm_blocks * self.csm_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def memory_layout(snapshot, end: int, merge: int = 2) -> MemoryLayout:
    """The layout of `snapshot`'s memory tokens, which end (exclusive) at token `end`.

    dam_features [D', Nf, C] and csm_features [K', Nl, C] become Nf / merge^2 and Nl / merge^2
    LLM tokens per block (the merger's spatial merge)."""
    unit = merge * merge
    dam, csm = snapshot.dam_features, snapshot.csm_features
    d_blocks, d_tokens = (int(dam.shape[0]), int(dam.shape[1]) // unit) if dam.numel() else (0, 0)
    c_blocks, c_tokens = (int(csm.shape[0]), int(csm.shape[1]) // unit) if csm.numel() else (0, 0)
    start = end - d_blocks * d_tokens - c_blocks * c_tokens
    if start < 0:
        raise ValueError(f"memory of {end - start} tokens cannot end at token {end}")
    return MemoryLayout(start, d_blocks, d_tokens, c_blocks, c_tokens)


def evidence_layers(num_layers: int) -> tuple[int, ...]:
    """Decoder layers whose attention evidence reads: the third quarter (at least one layer)."""
    first = num_layers // 2
    return tuple(range(first, max(first + 1, (3 * num_layers) // 4)))


@dataclass(frozen=True)
class BlockAttention:
    """An answer's attention to the memory blocks, in layout order (DAM blocks, then CSM blocks)."""

    mass: torch.Tensor  # [num_blocks] float32 on the CPU: mean attention probability per block
    layout: MemoryLayout
    layers: tuple[int, ...]
    rows: int  # query rows averaged over
    seconds: float  # time spent computing it after the answer (device work included)

    @property
    def memory_fraction(self) -> float:
        """Fraction of all attention (over the rows, heads and layers) that went to memory tokens."""
        return float(self.mass.sum())

    def shares(self) -> torch.Tensor:
        """Each block's share of the attention that went to memory ([num_blocks], sums to 1)."""
        total = self.mass.sum()
        return self.mass / total if total > 0 else torch.zeros_like(self.mass)


@torch.inference_mode()
def block_attention(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    layout: MemoryLayout,
    scale: float,
    *,
    first_row: int = 0,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass per memory block of each query row -> [n, num_blocks] float32 (keys' device);
    an answer's evidence is its mean over the rows.

    queries: per layer [n, H, D] (post-rotary); keys: per layer [N, Hkv, D], the cached keys. Query
    head h uses key head h // (H / Hkv), as transformers' repeat_kv. Which keys a row sees:
    causal (row i is prompt position first_row + i and sees keys 0 .. first_row + i), or with
    visible (bool [n, N'], N' <= N, True = attend) exactly those (the block mask of packed tails).
    Scores in float32, softmax over the keys a row sees, summed over each block's tokens; mean
    over layers and heads.
    """
    n, heads, dim = queries[0].shape
    kv_heads = keys[0].shape[1]
    groups = heads // kv_heads
    length = first_row + n if visible is None else visible.shape[1]
    device = keys[0].device
    total = torch.zeros(n, layout.num_blocks, dtype=torch.float32, device=device)
    chunk = max(1, _SCORES_PER_CHUNK // (heads * length))
    for q_all, k_all in zip(queries, keys, strict=True):
        k = k_all[:length].float().permute(1, 2, 0)  # [Hkv, D, N]
        for lo in range(0, n, chunk):
            q = q_all[lo : lo + chunk].float()  # [c, H, D]
            c = q.shape[0]
            q = q.view(c, kv_heads, groups, dim).permute(1, 0, 2, 3).reshape(kv_heads, c * groups, dim)
            scores = torch.matmul(q, k).mul_(scale)  # [Hkv, c * groups, N], row = row index * groups + g
            if visible is None:
                row = first_row + lo + torch.arange(c, device=device).repeat_interleave(groups)
                hidden = torch.arange(length, device=device)[None, :] > row[:, None]
            else:
                hidden = ~visible[lo : lo + c].to(device).repeat_interleave(groups, 0)
            probs = scores.masked_fill_(hidden[None], float("-inf")).softmax(-1)
            blocks = _per_block(probs[..., layout.start : layout.end], layout)  # [Hkv, c * groups, B]
            total[lo : lo + c] += blocks.view(kv_heads, c, groups, -1).sum((0, 2))
    return total / (len(queries) * heads)


def _per_block(probs: torch.Tensor, layout: MemoryLayout) -> torch.Tensor:
    """[..., memory tokens] -> [..., num_blocks]: sums over each block's tokens."""
    dam_len = layout.dam_blocks * layout.dam_tokens
    lead = probs.shape[:-1]
    dam = probs[..., :dam_len].reshape(*lead, layout.dam_blocks, layout.dam_tokens).sum(-1)
    csm = probs[..., dam_len:].reshape(*lead, layout.csm_blocks, layout.csm_tokens).sum(-1)
    return torch.cat([dam, csm], -1)


# ---------------------------------------------------------------------- eager path: recording


class QueryRecorder:
    """Collects, on the thread that runs an answer, the query of the token-choosing row(s) of every
    forward pass through the recorded layers (attention implementation RECORDING_SDPA, see install()).

    rows: the rows of each forward to keep (the last token of each packed condition prompt);
    None: its last row (an answer's prompt, then each token fed back)."""

    def __init__(self, layers: Sequence[int], rows: Sequence[int] | None = None):
        self._rows: dict[int, list[torch.Tensor]] = {int(layer): [] for layer in layers}
        self._keep = [-1] if rows is None else [int(r) for r in rows]

    @contextlib.contextmanager
    def recording(self):
        previous = getattr(_local, "recorder", None)
        _local.recorder = self
        try:
            yield self
        finally:
            _local.recorder = previous

    def add(self, layer: int, query: torch.Tensor) -> None:
        rows = self._rows.get(layer)
        if rows is not None:
            rows.append(query[0][:, self._keep].transpose(0, 1).clone())  # [rows kept, H, D]

    def queries(self) -> list[torch.Tensor]:
        """Per recorded layer (ascending) [n, H, D]."""
        return [torch.cat(self._rows[layer]) for layer in sorted(self._rows)]


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; records the query first while a QueryRecorder is active here."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.add(module.layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDING_SDPA, _recording_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(RECORDING_SDPA, sdpa_mask)


def install(llm) -> None:
    """Route the decoder layers' SDPA attention through the recording function (identical math;
    without an active recorder it only adds one thread-local lookup per layer)."""
    for config in {id(layer.self_attn.config): layer.self_attn.config for layer in llm.layers}.values():
        if config._attn_implementation == "sdpa":
            config._attn_implementation = RECORDING_SDPA
