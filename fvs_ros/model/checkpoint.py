"""Checkpoint loading without the official code: config translation, weight-name mapping, weights.

Three on-disk formats are supported, all stored with the tensor names transformers 4.45 gave
Qwen2-VL (`model.layers.N.*`, `visual.blocks.N.*`, `lm_head.weight`; transformers 5.x
`save_pretrained` still writes these names):

- `flash_vstream_qwen2_vl`: the official Flash-VStream-Qwen checkpoints. A Qwen2-VL config with
  the memory settings in `vision_config.flash_memory_config`; the memory has no weights.
- `qwen2_vl`, `qwen2_5_vl`: Qwen2-VL / Qwen2.5-VL (instruct) checkpoints, used training-free.

The model is built on the meta device from the config and the tensors are assigned to it, so
peak memory is one copy of the weights, in the caller's dtype, on the caller's device.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from . import quant

FLASH_VSTREAM = "flash_vstream_qwen2_vl"
QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"

ARCHITECTURES = {
    FLASH_VSTREAM: (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    QWEN2_VL: (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    QWEN2_5_VL: (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}

# Memory size for backbones without a flash_memory_config (paper setting: 60 CSM slots, 30 DAM frames).
DEFAULT_MEMORY = {"csm_slots": 60, "dam_frames": 30}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(Exception):
    """A model source that cannot be loaded; the message is one line meant for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class CheckpointConfig:
    """What a checkpoint's config.json says, translated for transformers 5.x."""

    model_type: str  # one of ARCHITECTURES
    hf_config: Qwen2VLConfig | Qwen2_5_VLConfig
    memory_defaults: dict  # MemoryConfig keyword arguments (csm_slots, dam_frames)


def resolve_source(source: str | Path) -> Path:
    """Local directory for `source`: itself if it is a directory, else a hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model source {str(source)!r} is a file, not a checkpoint directory")
    if isinstance(source, Path) or not _HUB_ID.match(source):
        raise ModelLoadError(f"model source {str(source)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # network, auth, unknown repo: all mean "cannot get it"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"model source {source!r} is not a local directory "
            f"and could not be fetched from the hub: {reason}"
        ) from None


def read_config(ckpt_dir: Path) -> CheckpointConfig:
    """Parse config.json; the official format becomes a plain Qwen2-VL config plus memory defaults."""
    config_file = ckpt_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{ckpt_dir} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from None
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r} in {config_file} (supported: {', '.join(ARCHITECTURES)})"
        )
    memory_defaults = dict(DEFAULT_MEMORY)
    if model_type == FLASH_VSTREAM:
        raw = json.loads(json.dumps(raw))  # deep copy: the edits below stay local
        flash = raw.get("vision_config", {}).pop("flash_memory_config", None)
        if flash is None:
            raise ModelLoadError(
                f"{config_file}: {FLASH_VSTREAM} config without vision_config.flash_memory_config"
            )
        memory_defaults = flash_memory_defaults(flash, config_file)
        raw["model_type"] = QWEN2_VL
        raw.pop("architectures", None)
    config_cls, _ = ARCHITECTURES[model_type]
    try:
        hf_config = config_cls.from_dict(raw)
    except Exception as err:
        raise ModelLoadError(f"{config_file} is not a valid {model_type} config: {err}") from None
    return CheckpointConfig(model_type, hf_config, memory_defaults)


def flash_memory_defaults(flash: dict, where: Path) -> dict:
    """MemoryConfig arguments from flash_memory_config.

    The official FlashMemory halves both lengths (temporal_length 120 -> 60 CSM slots,
    spatial_length 60 -> 30 DAM frames); only its kmeans_ordered / klarge_retrieve / pool 2
    variant, the one the checkpoints were trained with, is implemented.
    """
    expected = {
        "flash_memory_temporal_method": "kmeans_ordered",
        "flash_memory_spatial_method": "klarge_retrieve",
        "flash_memory_temporal_poolsize": 2,
    }
    for key, value in expected.items():
        if flash.get(key, value) != value:
            raise ModelLoadError(f"{where}: unsupported {key}={flash[key]!r} (only {value!r} is implemented)")
    return {
        "csm_slots": int(flash["flash_memory_temporal_length"]) // 2,
        "dam_frames": int(flash["flash_memory_spatial_length"]) // 2,
    }


def map_weight_name(name: str) -> str:
    """Checkpoint tensor name -> parameter name in transformers 5.x `*ForConditionalGeneration`.

    transformers 4.45 (official Flash-VStream, hub Qwen2-VL/2.5-VL, 5.x save_pretrained) names:
        visual.*   -> model.visual.*
        model.*    -> model.language_model.*
        lm_head.*  -> lm_head.*
    Names already in the 5.x layout pass through; anything else stays as is and is then
    reported as unexpected.
    """
    if name.startswith(("model.visual.", "model.language_model.", "lm_head.")):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (single file or sharded with an index)."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index} is not a shard index with a weight_map: {err}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ModelLoadError(f"{index}: weight_map must map tensor names to shard file names")
        shards = [shard_path(ckpt_dir, s) for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(
                f"{ckpt_dir}: weight shards listed in the index are missing: {', '.join(missing)}"
            )
        return shards
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{ckpt_dir} has no model.safetensors (only safetensors weights are supported)")


def shard_path(ckpt_dir: Path, name: str) -> Path:
    """The shard file `name` of a checkpoint index: a file directly inside the checkpoint directory.

    A name with a directory part, or one that resolves (symlinks followed) outside the directory,
    is refused: an index must not make the loader open files elsewhere (`../../etc/hostname`)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ModelLoadError(
            f"{ckpt_dir}: shard {name!r} in the index is not a file name inside the checkpoint"
        )
    path = ckpt_dir / name
    if path.exists() and path.resolve().parent != ckpt_dir.resolve():
        raise ModelLoadError(f"{ckpt_dir}: shard {name!r} in the index resolves outside the checkpoint")
    return path


def checkpoint_tensor_names(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def expected_parameters(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(names the checkpoint must provide, tied names it may omit)."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    return set(model.state_dict()) - tied, tied


def build_model(
    ckpt: CheckpointConfig,
    ckpt_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    weights: str = "bf16",
    parts: tuple[str, ...] = ("llm",),
):
    """Build the transformers model on the meta device and assign the checkpoint's tensors.

    weights "fp8" / "int8": the parts' linear layers (quant.py) are quantized as their tensors
    are read, one at a time, so the device never holds more than one layer in `dtype` beside the
    8-bit ones. Returns (model, seconds spent quantizing). Fails on missing or unexpected tensor
    names and on weights that do not fit the device.
    """
    _, model_cls = ARCHITECTURES[ckpt.model_type]
    with torch.device("meta"):
        model = model_cls._from_config(ckpt.hf_config, attn_implementation="sdpa", dtype=dtype)
    names = checkpoint_tensor_names(weight_files(ckpt_dir))
    mapped = {map_weight_name(n): n for n in names}
    required, tied = expected_parameters(model)
    missing = sorted(required - mapped.keys())
    unexpected = sorted(mapped.keys() - required - tied)
    if missing or unexpected:
        raise ModelLoadError(
            f"{ckpt_dir}: weights do not match a {ckpt.model_type} model of this config: "
            f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{[mapped[u] for u in unexpected[:3]]}"
        )
    quantized = {f"{name}.weight" for name in quant.targets(model, weights, parts)}
    check_fits(names, dtype, device, ckpt_dir, quantized, weights)
    quantize_s = 0.0
    try:
        state, eight_bit = {}, {}
        for file in sorted(set(names.values())):
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    mapped = map_weight_name(name)
                    if mapped in quantized:
                        t0 = time.perf_counter()
                        eight_bit[mapped.removesuffix(".weight")] = quant.quantize_weight(
                            f.get_tensor(name), weights
                        )
                        quantize_s += time.perf_counter() - t0
                    elif mapped in required:
                        state[mapped] = f.get_tensor(name).to(dtype)
        model.load_state_dict(state, strict=False, assign=True)
        del state
        for name, (q, scale) in eight_bit.items():
            quant.replace_module(
                model, name, quant.QuantLinear(q, scale, model.get_submodule(name).bias, dtype)
            )
        if tied:
            model.lm_head.weight = model.get_input_embeddings().weight
        materialize_buffers(model, device)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise ModelLoadError(
            f"{ckpt_dir}: weights do not fit on {device} in {dtype} (out of memory)"
        ) from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # quantize_s covers the GPU work
    return model.eval().requires_grad_(False), quantize_s


def is_out_of_memory(err: Exception) -> bool:
    """torch's OOM error, or the RuntimeError an allocator (CPU, safetensors) raises instead."""
    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


def materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers a meta build leaves empty (rotary inverse frequencies).

    They are rebuilt in float32 from the module's config, whatever the weight dtype, so
    large positions keep their precision.
    """
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer)


def check_fits(
    names: dict[str, Path],
    dtype: torch.dtype,
    device: torch.device,
    ckpt_dir: Path,
    quantized: set[str] = frozenset(),
    weights: str = "bf16",
) -> None:
    """Fail early, with sizes, when the weights cannot fit the device's free memory."""
    need = weight_bytes(tensor_shapes(names), dtype, quantized, weights)
    free = free_memory(device)
    if free is not None and need > free:
        raise ModelLoadError(
            f"{ckpt_dir}: weights need {_gib(need)} in {dtype} (weights {weights}) "
            f"but {device} has {_gib(free)} free"
        )


def tensor_shapes(names: dict[str, Path]) -> dict[str, list[int]]:
    """Parameter name (mapped) -> shape of the checkpoint's tensor, from the safetensors headers."""
    shapes = {}
    for file in sorted(set(names.values())):
        with safe_open(file, framework="pt") as f:
            shapes.update({map_weight_name(name): f.get_slice(name).get_shape() for name in f.keys()})
    return shapes


def weight_bytes(
    shapes: dict[str, list[int]], dtype: torch.dtype, quantized: set[str] = frozenset(), weights: str = "bf16"
) -> int:
    """Bytes the tensors take once loaded: `dtype`, or for the names in `quantized` 8 bits per weight
    plus the scales QuantLinear keeps per output row (float32, and int8's copy in `dtype`)."""
    total = 0
    for name, shape in shapes.items():
        if name in quantized:
            total += _numel(shape) + shape[0] * (4 + quant.scale_copy_bytes(weights, dtype))
        else:
            total += _numel(shape) * dtype.itemsize
    return total


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (CUDA: driver's count, CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
