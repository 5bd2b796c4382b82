"""Device memory a configuration will take, computed before loading (`max_gpu_memory`, docs/model.md).

Four parts, each from the checkpoint (safetensors headers, config.json) and the memory and engine
settings, never measured:

- weights: every tensor in the model dtype, or 8 bits + one float32 scale per output row for the
  layers `weights` quantizes (quant.py);
- memory: FlashMemory with a full bank (FlashMemory.full_nbytes, exact) plus the snapshot a
  reader (the prefix builder) holds while the next one is published;
- prefix KV: the prompt of a full memory of the largest frames the pixel budget allows; the
  prefix being served, the one being rebuilt, and the answers' cache (FastDecoder's static cache,
  or the eager path's copy of the prefix per answer);
- activations: the largest tensors alive in one forward, per token, times the tokens of the
  largest forward of each kind: a prefix-build chunk, the batched ViT (max_batch slots), and
  the FastDecoder's largest question bucket (its CUDA graphs keep their own pool).

The activation part is an upper-bound model of what the transformers layers hold at once, not a
measurement: benchmarks/bench_quant.py prints it beside the running engine's peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from fvs_ros.memory import FlashMemory, MemoryConfig

from . import quant
from .checkpoint import (
    QWEN2_5_VL,
    CheckpointConfig,
    ModelLoadError,
    checkpoint_tensor_names,
    free_memory,
    tensor_shapes,
    weight_bytes,
    weight_files,
)

CHAT_TEMPLATE_TOKENS = 32  # tokens the chat template adds around the system prompt and memory
QUESTION_BUCKET = 256  # FastDecoder's largest question bucket (fast_decode.DEFAULT_BUCKETS)
CAPACITY_ALIGN = 512  # fast_decode.CAPACITY_ALIGN


class BudgetExceeded(ModelLoadError):
    """The configuration's memory budget is over the limit: the model is fine, the settings too large."""


@dataclass(frozen=True)
class BudgetCheck:
    """What load_model checks the budget for (StreamEngine settings), and against what."""

    # a MemoryConfig, or MemoryConfig fields over the checkpoint's memory defaults (None: the defaults)
    memory: MemoryConfig | Mapping | None = None
    max_new_tokens: int = 1024
    system_prompt: str = ""
    chunk_tokens: int = 1024  # EngineConfig.prefill_chunk_tokens (0: one pass)
    vit_batch: int = 16  # EngineConfig.max_batch: frames (so at most as many slots) per ViT call
    max_gib: float = 0.0  # max_gpu_memory: 0 = the device's free memory
    log: Callable[[str], None] | None = None  # where the budget is printed before loading


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a configuration takes on the model's device."""

    weights: int
    memory: int
    prefix_kv: int
    activations: int
    weights_mode: str
    dtype: torch.dtype
    prefix_tokens: int  # the prompt of a full memory, bound used for the prefix KV

    @property
    def total(self) -> int:
        return self.weights + self.memory + self.prefix_kv + self.activations

    def describe(self) -> str:
        return (
            f"weights {gib(self.weights)} ({self.weights_mode}, {str(self.dtype).removeprefix('torch.')}) "
            f"+ memory {gib(self.memory)} + prefix KV {gib(self.prefix_kv)} "
            f"+ activations and graphs {gib(self.activations)} = {gib(self.total)}"
        )


def estimate(
    shapes: dict[str, list[int]],
    checkpoint: CheckpointConfig,
    dtype: torch.dtype,
    weights: str,
    memory: MemoryConfig,
    *,
    max_pixels: int,
    max_new_tokens: int,
    system_prompt: str,
    chunk_tokens: int = 1024,
    vit_batch: int = 16,
    fast_decode: bool = True,
) -> MemoryBudget:
    """The budget of `checkpoint` (its tensors' `shapes` by parameter name: checkpoint_shapes) in
    `dtype` / `weights` with `memory`, for frames up to max_pixels."""
    quantized = {n for n, s in shapes.items() if quant.is_target(n, s, weights)}
    text = checkpoint.hf_config.get_text_config()
    vision = checkpoint.hf_config.vision_config
    hidden, inter = text.hidden_size, text.intermediate_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    size = dtype.itemsize

    # memory: full-resolution ViT patches of the largest frame, their 2x2-pooled copy, C features
    feature_dim = vision.hidden_size if checkpoint.model_type == QWEN2_5_VL else vision.embed_dim
    nf = max_pixels // vision.patch_size**2
    nl = nf // 4
    flash = FlashMemory.full_nbytes(memory, nl, nf, feature_dim, dtype)
    reader = memory.csm_slots * nl * feature_dim * 4 + memory.dam_frames * nf * feature_dim * size

    # prefix KV: [template + system prompt (a token is at least one character) + DAM + CSM tokens]
    merge = vision.spatial_merge_size**2
    prompt = CHAT_TEMPLATE_TOKENS + len(system_prompt) + memory.dam_frames * nf // merge
    prompt += memory.csm_slots * nl // merge + 1
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * size
    tail = QUESTION_BUCKET + max_new_tokens + 1
    answers = -(-(prompt + tail) // CAPACITY_ALIGN) * CAPACITY_ALIGN if fast_decode else prompt + tail
    prefix_kv = (2 * prompt + answers) * per_token

    # activations: residual, normed (float32 upcast), q/k/v, attention output, MLP gate/up/product
    layer = (4 * hidden + 2 * kv_heads * head_dim + 3 * inter) * size + 2 * hidden * 4
    if weights == "fp8":  # the per-token quantized copy of the largest linear input
        layer += max(hidden, inter) + 4
    chunk = min(chunk_tokens or prompt, prompt) * layer
    vit_width = vision.hidden_size if checkpoint.model_type == QWEN2_5_VL else vision.embed_dim
    vit_inter = getattr(vision, "intermediate_size", None) or vit_width * vision.mlp_ratio
    vit_tokens = vit_batch * (nf + nl)  # both resolutions of up to vit_batch slots in one ViT call
    vit = vit_tokens * ((6 * vit_width + 2 * vit_inter) * size + 2 * vit_width * 4)
    graphs = QUESTION_BUCKET * layer + QUESTION_BUCKET * text.vocab_size * 4 if fast_decode else 0
    return MemoryBudget(
        weight_bytes(shapes, dtype, quantized, weights),
        flash + reader,
        prefix_kv,
        chunk + vit + graphs,
        weights,
        dtype,
        prompt,
    )


def checkpoint_shapes(ckpt_dir: Path) -> dict[str, list[int]]:
    """Parameter name -> shape of every tensor of a checkpoint, from its safetensors headers."""
    return tensor_shapes(checkpoint_tensor_names(weight_files(ckpt_dir)))


def check(budget: MemoryBudget, device: torch.device, max_gib: float) -> str:
    """The limit the budget was checked against, as text; BudgetExceeded when it does not fit.

    max_gib 0: the device's free memory (CUDA: the driver's count; CPU: MemAvailable); otherwise
    that many GiB, or the free memory where less is free."""
    free = free_memory(device)
    limit = None if free is None else free
    if max_gib > 0:
        limit = int(max_gib * 2**30) if free is None else min(int(max_gib * 2**30), free)
    if limit is None:
        return f"{device}: free memory unknown, not checked"
    source = f"max_gpu_memory {max_gib:g} GiB" if max_gib > 0 else "free memory"
    where = f"{source} on {device}: {gib(limit)}"
    if budget.total > limit:
        raise BudgetExceeded(
            f"this configuration needs about {budget.describe()}, but {where}; "
            "use weights int8 or fp8, fewer dam_frames / csm_slots, a smaller model, "
            "or raise max_gpu_memory"
        )
    return where


def gib(nbytes: int) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
