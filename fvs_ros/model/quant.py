"""8-bit weights for the linear layers, quantized at load from the bf16 checkpoint (`weights` parameter).

    bf16  the checkpoint's numerics (the default; nothing here runs)
    fp8   e4m3 weights with one scale per output channel, activations quantized per token at run
          time (dynamic scales), matmul by `torch._scaled_mm` (cuBLAS FP8 tensor cores: compute
          capability >= 8.9, Ada/Hopper; PyTorch's CPU kernel on CPU, for tests)
    int8  weight-only: int8 weights with one scale per output channel, activations stay in the
          model dtype; the matmul dequantizes (CPU: `torch._weight_int8pack_mm`; CUDA: a Triton
          kernel reading the int8 weight directly for up to 32 rows (decode, short questions), and
          `x @ q.T * scale` through cuBLAS for long prefills) -- for GPUs without FP8 (Ampere, Orin)

Both keep half the bytes of bf16 per weight. Scales are absmax / 448 (fp8) or absmax / 127 (int8)
of each output row, so every row uses its whole range and no weight clips. `QuantLinear` is a
drop-in for `nn.Linear` (same forward signature and output dtype): the transformers layers,
FastDecoder and FastVision run unchanged and CUDA graphs capture it (no host sync).

What is quantized: the language model's decoder-layer projections (q/k/v/o, gate/up/down: 99 %
of its weights) and, with `parts` including "vision", the ViT blocks'; never the embeddings,
lm_head or the merger. Why this is hand-written rather than torchao: docs/model.md ("8-bit weights").
"""

from __future__ import annotations

import re

import torch
from torch import nn

WEIGHT_MODES = ("bf16", "fp8", "int8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
# Linear layers quantized, by part: the text decoder's layers and the ViT's blocks.
PART_PATTERNS = {
    "llm": re.compile(r"^model\.language_model\.layers\.\d+\."),
    "vision": re.compile(r"^model\.visual\.blocks\.\d+\."),
}
# Small batches (decode steps, question tails up to FastDecoder's 32-token bucket) go through the
# Triton int8 kernel on CUDA; it reads the weight once per 16 rows, cuBLAS's path dequantizes it.
TRITON_MAX_ROWS = 32


class QuantizationUnsupported(ValueError):
    """This weights mode cannot run on this device; the message says why and what to use."""


def scale_copy_bytes(mode: str, dtype: torch.dtype) -> int:
    """Bytes per output row QuantLinear keeps besides the float32 scale: int8's scale in `dtype`."""
    return dtype.itemsize if mode == "int8" and dtype != torch.float32 else 0


def check_mode(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise QuantizationUnsupported when `mode` cannot run on `device` in `dtype`."""
    if mode not in WEIGHT_MODES:
        raise QuantizationUnsupported(f"unknown weights mode {mode!r}: use one of {', '.join(WEIGHT_MODES)}")
    if mode == "fp8" and device.type == "cuda":
        problem = fp8_problem(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
        if problem:
            raise QuantizationUnsupported(problem)
    elif mode == "fp8" and not _scaled_mm_runs(device):
        raise QuantizationUnsupported(
            f"weights fp8: this PyTorch has no FP8 matmul (torch._scaled_mm) on {device.type}: "
            "use weights int8 or bf16"
        )
    if mode == "fp8" and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantizationUnsupported(f"weights fp8 needs a bf16/fp16/fp32 model, not {dtype}")
    if mode == "int8" and device.type == "cpu" and not _int8pack_runs(dtype):
        raise QuantizationUnsupported(f"weights int8 on CPU: torch._weight_int8pack_mm does not take {dtype}")


def is_target(name: str, shape, mode: str, parts: tuple[str, ...] = ("llm",)) -> bool:
    """Whether the parameter `name` (transformers 5.x name) of `shape` is quantized in `mode`: the
    2-D weights of the parts' layers (their linear projections; norms are 1-D). fp8 also needs both
    dimensions to be multiples of 16 (cuBLAS FP8 GEMMs)."""
    if mode == "bf16" or len(shape) != 2 or not name.endswith(".weight"):
        return False
    if mode == "fp8" and (shape[0] % 16 or shape[1] % 16):
        return False
    return any(PART_PATTERNS[p].match(name) for p in parts)


def fp8_problem(gpu: str, capability: tuple[int, int]) -> str | None:
    """Why a GPU of this compute capability cannot run weights fp8, or None."""
    if tuple(capability) >= (8, 9):
        return None
    major, minor = capability
    return (
        f"weights fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper); "
        f"{gpu} is {major}.{minor}: use weights int8 (8-bit weight-only) or bf16"
    )


def targets(model: nn.Module, mode: str, parts: tuple[str, ...] = ("llm",)) -> list[str]:
    """Names of the nn.Linear modules that quantizing `model` in `mode` replaces."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and is_target(f"{name}.weight", module.weight.shape, mode, parts)
    ]


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (q [N, K] fp8/int8, scale [N] float32) with weight ~= q * scale[:, None].

    Computed in float32 on the weight's device, one block of rows at a time (bounded scratch)."""
    q = torch.empty(weight.shape, dtype=FP8 if mode == "fp8" else torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    top = FP8_MAX if mode == "fp8" else INT8_MAX
    for start in range(0, weight.shape[0], 4096):
        rows = weight[start : start + 4096].float()
        s = rows.abs().amax(dim=1).clamp(min=1e-12) / top
        scale[start : start + 4096] = s
        scaled = rows / s[:, None]
        q[start : start + 4096] = scaled.to(FP8) if mode == "fp8" else scaled.round_().clamp_(-top, top)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale[:, None] in `dtype` (the weights a quantized layer computes with)."""
    return (q.float() * scale[:, None]).to(dtype)


class QuantLinear(nn.Module):
    """nn.Linear with 8-bit weights: `weight` [N, K] fp8/int8, `weight_scale` [N] float32, optional bias."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.mode = "fp8" if q.dtype == FP8 else "int8"
        self.out_features, self.in_features = q.shape
        self.dtype = dtype  # the activations' dtype (the model's)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        # _scaled_mm takes the weight scales as a [1, N] row (a view); int8 in the model dtype (a copy
        # unless float32: scale_copy_bytes)
        self.register_buffer("_scale_row", self.weight_scale[None], persistent=False)
        if self.mode == "int8":
            self.register_buffer("_scale_act", self.weight_scale.to(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self._fp8(rows) if self.mode == "fp8" else self._int8(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token dynamic scales: each row of x scaled into e4m3's range, then one FP8 GEMM."""
        if x.is_cuda and _triton is not None:
            xq, x_scale = _triton.fp8_rows(x, FP8_MAX)  # one kernel instead of ~6 passes over x
        else:
            xq, x_scale = fp8_rows(x)
        return torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=self._scale_row, out_dtype=x.dtype
        )

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x.contiguous(), self.weight, self._scale_act)
        if x.shape[0] <= TRITON_MAX_ROWS and _triton is not None and x.dtype != torch.float32:
            return _triton.int8_weight_only_mm(x, self.weight, self.weight_scale)
        return (x @ self.weight.t().to(x.dtype)) * self._scale_act


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic scales: x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]), x ~= q * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
    return (x / scale).to(FP8), scale


def quantize_linear(linear: nn.Linear, mode: str) -> QuantLinear:
    """A QuantLinear computing what `linear` computes, with its weight in `mode`."""
    q, scale = quantize_weight(linear.weight.detach(), mode)
    return QuantLinear(q, scale, linear.bias, linear.weight.dtype)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, mode: str, parts: tuple[str, ...] = ("llm",)) -> int:
    """Replace the parts' linear layers of an in-memory model by QuantLinear (in place); -> layers replaced.

    Peak memory: the model plus one layer's 8-bit copy. load_model quantizes while it reads the
    checkpoint instead (checkpoint.build_model), so a model is never whole in bf16 on the device."""
    names = targets(model, mode, parts)
    for name in names:
        replace_module(model, name, quantize_linear(model.get_submodule(name), mode))
    return len(names)


def quantized_layers(model: nn.Module) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def _scaled_mm_runs(device: torch.device) -> bool:
    """Whether a rowwise-scaled FP8 matmul runs here (PyTorch's CPU build has one since 2.x)."""
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _int8pack_runs(dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(1, 16, dtype=dtype)
        torch._weight_int8pack_mm(x, torch.ones(16, 16, dtype=torch.int8), torch.ones(16, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _load_triton():
    """quant_triton (its kernels), or None where Triton is not installed (CPU machines, CI)."""
    try:
        from . import quant_triton
    except ImportError:
        return None
    return quant_triton


_triton = _load_triton()
