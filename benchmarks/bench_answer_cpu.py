"""Answer latency with and without the memory prefix cache, on a random checkpoint of a chosen size.

    python benchmarks/bench_answer_cpu.py --size small            # CPU, float32 (default)
    python benchmarks/bench_answer_cpu.py --size 2b --device cuda --dtype bfloat16 --frames 64

Writes a random official-format (flash_vstream_qwen2_vl) checkpoint of the size to a temporary
directory, loads it with fvs_ros.model.load_model, streams random 16:9 frames (336x560 after
resize: 240 DAM tokens, 60 CSM tokens per slot) through encode_frames and FlashMemory, then times
prefill_memory, answer (cached prefix) and answer_uncached, and checks both give the same tokens.
Random weights: the timings are the point, the answers are noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from fvs_ros.memory import FlashMemory, MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import TOKEN_IDS, TOKENIZER_DIR

SIZES = {  # (LLM hidden, layers, heads, kv heads, mlp, ViT width, ViT depth, ViT heads)
    "tiny": (64, 2, 2, 1, 128, 32, 2, 2),
    "small": (512, 4, 8, 2, 1536, 256, 4, 4),
    "2b": (1536, 28, 12, 2, 8960, 1280, 32, 16),  # Qwen2-VL-2B shapes (384-token test vocabulary)
}


def official_config(size: str, csm_slots: int, dam_frames: int) -> dict:
    hidden, layers, heads, kv, mlp, width, depth, vit_heads = SIZES[size]
    return {
        "model_type": "flash_vstream_qwen2_vl",
        "architectures": ["FlashVStreamQwen2VLModel"],
        "vocab_size": 384,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": mlp,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(hidden // heads)},
        **TOKEN_IDS,
        "vision_config": {
            "model_type": "qwen2_vl",
            "embed_dim": width,
            "depth": depth,
            "num_heads": vit_heads,
            "hidden_size": hidden,
            "flash_memory_config": {
                "flash_memory_temporal_length": 2 * csm_slots,
                "flash_memory_temporal_method": "kmeans_ordered",
                "flash_memory_temporal_poolsize": 2,
                "flash_memory_temporal_pca_dim": 32,
                "flash_memory_spatial_length": 2 * dam_frames,
                "flash_memory_spatial_method": "klarge_retrieve",
            },
        },
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (t, h, w): 16/24/24 of 64, scaled."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def write_checkpoint(
    out: Path, size: str, csm_slots: int, dam_frames: int, device: str, dtype: torch.dtype
) -> None:
    config = official_config(size, csm_slots, dam_frames)
    plain = {k: v for k, v in config.items() if k != "architectures"} | {"model_type": "qwen2_vl"}
    plain["vision_config"] = {k: v for k, v in config["vision_config"].items() if k != "flash_memory_config"}
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(plain)).to(dtype)
    model.save_pretrained(out)
    del model
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for file in TOKENIZER_DIR.glob("*.json"):
        (out / file.name).write_text(file.read_text())
    (out / "merges.txt").write_text((TOKENIZER_DIR / "merges.txt").read_text())


def with_grid(snap, full_hw):
    """Snapshot with full_hw (docs/architecture.md), for a memory that does not record it yet."""
    if hasattr(snap, "full_hw"):
        return snap
    return SimpleNamespace(
        **{f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}, full_hw=full_hw
    )


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=32, help="frames streamed into memory (one slot each)")
    parser.add_argument("--csm-slots", type=int, default=60)
    parser.add_argument("--dam-frames", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="frames per encode_frames call")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), args.size, args.csm_slots, args.dam_frames, args.device, dtype)
        lm, t_load = timed(lambda: load_model(tmp, dtype=dtype, device=args.device), sync)
    print(
        f"model {args.size} on {args.device} {args.dtype}: "
        f"loaded in {t_load:.2f} s, memory {lm.memory_defaults}"
    )

    mem = FlashMemory(MemoryConfig(**lm.memory_defaults), device=lm.device)
    rng = np.random.default_rng(0)
    t_encode = t_update = 0.0
    for start in range(0, args.frames, args.batch):
        frames = rng.integers(0, 256, (min(args.batch, args.frames - start), 360, 640, 3), dtype=np.uint8)
        feats, dt = timed(lambda frames=frames: lm.encode_frames(frames), sync)
        t_encode += dt
        stamps = torch.arange(start, start + len(frames), dtype=torch.float64)
        snap, dt = timed(lambda feats=feats, stamps=stamps: mem.update(feats.low, feats.full, stamps), sync)
        t_update += dt
    snap = with_grid(snap, feats.full_hw)
    print(
        f"{args.frames} frames {lm.frame_size(360, 640)}: "
        f"encode {1e3 * t_encode / args.frames:.1f} ms/frame, "
        f"memory update {1e3 * t_update / args.frames:.1f} ms/frame"
    )

    lm.prefill_memory(snap)  # warm-up
    prefix, t_prefill = timed(lambda: lm.prefill_memory(snap), sync)
    print(f"prefill_memory: {prefix.num_tokens} tokens in {1e3 * t_prefill:.0f} ms")
    questions = [f"Question {i}: what is happening in the video right now?" for i in range(args.questions)]
    for q in questions:
        cached, _ = timed(lambda q=q: lm.answer(prefix, q, args.max_new_tokens), sync)
        uncached, _ = timed(lambda q=q: lm.answer_uncached(snap, q, args.max_new_tokens), sync)
        same = "same tokens" if cached.token_ids == uncached.token_ids else "DIFFERENT tokens"
        print(
            f"answer: cached ttft {1e3 * cached.ttft_s:.1f} ms total {1e3 * cached.total_s:.1f} ms "
            f"({len(cached.token_ids)} tokens, {cached.prompt_tokens} prompt) | uncached ttft "
            f"{1e3 * uncached.ttft_s:.1f} ms total {1e3 * uncached.total_s:.1f} ms | {same}"
        )


if __name__ == "__main__":
    main()
