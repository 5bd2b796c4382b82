"""Tiny random checkpoints in every supported format, for tests and a demo without the hub.

    python -m fvs_ros.model.tiny OUT_DIR --format flash_vstream|qwen2_vl|qwen2_5_vl [--seed 0]

All share one shape (LLM: 2 layers, width 64, vocab 384; ViT: 2 blocks, width 32) and the
tiny tokenizer in tiny_tokenizer/ (see its PROVENANCE.md). qwen2_vl and qwen2_5_vl are written
by transformers' save_pretrained; flash_vstream is written the way the official code writes
its checkpoints: a flat Qwen2-VL config with `model_type: flash_vstream_qwen2_vl` and the memory
settings in `vision_config.flash_memory_config`, tensors named as transformers 4.45 named
Qwen2-VL (which is also what save_pretrained writes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

TOKENIZER_DIR = Path(__file__).with_name("tiny_tokenizer")
FORMATS = ("flash_vstream", "qwen2_vl", "qwen2_5_vl")
# The tiny tokenizer's special tokens, as a Qwen2-VL config names them (also for larger random models)
TOKEN_IDS = {
    "bos_token_id": 320,
    "eos_token_id": 322,
    "pad_token_id": 320,
    "vision_start_token_id": 329,
    "vision_end_token_id": 330,
    "vision_token_id": 331,
    "image_token_id": 332,
    "video_token_id": 333,
}

_TEXT = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    **TOKEN_IDS,
}
_QWEN2_VL_VISION = {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}
_QWEN2_5_VL_VISION = {
    "model_type": "qwen2_5_vl",
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
    "window_size": 112,
    "tokens_per_second": 2,
}
FLASH_MEMORY_CONFIG = {  # official names; FlashMemory halves the lengths: 4 CSM slots, 2 DAM frames
    "flash_memory_temporal_length": 8,
    "flash_memory_temporal_method": "kmeans_ordered",
    "flash_memory_temporal_poolsize": 2,
    "flash_memory_temporal_pca_dim": 32,
    "flash_memory_spatial_length": 4,
    "flash_memory_spatial_method": "klarge_retrieve",
}


def official_config(text: dict | None = None, vision: dict | None = None) -> dict:
    """config.json of an official-format checkpoint (as tiny_ckpt of the fidelity reference);
    text / vision replace entries of the tiny shape (see build_random)."""
    vision = {**_QWEN2_VL_VISION, **(vision or {}), "flash_memory_config": FLASH_MEMORY_CONFIG}
    return {
        **_TEXT,
        **(text or {}),
        "architectures": ["FlashVStreamQwen2VLModel"],
        "model_type": "flash_vstream_qwen2_vl",
        "vision_config": vision,
    }


def build_random(
    fmt: str, seed: int, text: dict | None = None, vision: dict | None = None
) -> torch.nn.Module:
    """A randomly initialised transformers model of the tiny shape for `fmt`; text / vision replace
    entries of the LLM / ViT config (a wider random model, e.g. head_dim 128 for the GPU tests)."""
    torch.manual_seed(seed)
    text = {**_TEXT, **(text or {})}
    if fmt == "qwen2_5_vl":
        config = Qwen2_5_VLConfig.from_dict(
            {**text, "model_type": "qwen2_5_vl", "vision_config": {**_QWEN2_5_VL_VISION, **(vision or {})}}
        )
        return Qwen2_5_VLForConditionalGeneration(config)
    config = Qwen2VLConfig.from_dict(
        {**text, "model_type": "qwen2_vl", "vision_config": {**_QWEN2_VL_VISION, **(vision or {})}}
    )
    return Qwen2VLForConditionalGeneration(config)


def write_tiny_checkpoint(
    out_dir: str | Path,
    fmt: str = "flash_vstream",
    seed: int = 0,
    *,
    text: dict | None = None,
    vision: dict | None = None,
) -> Path:
    """Write a tiny random checkpoint of format `fmt` (one of FORMATS) to out_dir; returns out_dir.
    text / vision: config entries replacing the tiny shape's (build_random)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    build_random(fmt, seed, text, vision).save_pretrained(out)
    if fmt == "flash_vstream":
        (out / "config.json").write_text(json.dumps(official_config(text, vision), indent=2) + "\n")
    for file in TOKENIZER_DIR.iterdir():
        if file.suffix in (".json", ".txt"):
            shutil.copyfile(file, out / file.name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--format", choices=FORMATS, default="flash_vstream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out_dir, args.format, args.seed))


if __name__ == "__main__":
    main()
