"""Backbones for Flash Memory streaming: Flash-VStream-Qwen2-VL, Qwen2-VL and Qwen2.5-VL checkpoints.

    lm = load_model("zhang9302002/Flash-VStream-Qwen-7b", dtype=torch.bfloat16, device="cuda")
    feats = lm.encode_frames(frames)            # ViT features for FlashMemory.update
    prefix = lm.prefill_memory(snapshot)        # KV cache of [system prompt + memory]
    gen = lm.answer(prefix, "What is on the table?", max_new_tokens=64)

See docs/model.md.
"""

from .budget import BudgetCheck, BudgetExceeded, MemoryBudget
from .checkpoint import ModelLoadError, map_weight_name
from .video_lm import (
    FrameFeatures,
    Generation,
    MemoryPrefix,
    PromptInputs,
    VideoLM,
    load_model,
    resolve_device_dtype,
)

__all__ = [
    "BudgetCheck",
    "BudgetExceeded",
    "MemoryBudget",
    "FrameFeatures",
    "Generation",
    "MemoryPrefix",
    "ModelLoadError",
    "PromptInputs",
    "VideoLM",
    "load_model",
    "map_weight_name",
    "resolve_device_dtype",
]
