"""Fused small kernels for the decoder layers: RMSNorm, residual add + RMSNorm, SiLU-and-multiply.

Why: in a 10.8k-token prefix build on an H100, ~79 ms of the ~314 ms are memory-bound small
kernels (benchmarks/gpu_notes.md, runs 13-15): transformers' RMSNorm is a float32 chain of about
six kernels (cast, pow, mean, add + rsqrt, mul, cast, weight mul), each residual add and the
SiLU and the multiply are one pass each. One kernel per step reads each activation once.

Numerics: each kernel rounds where transformers rounds, so on the same inputs the outputs match
transformers' modules up to the float32 reduction order of the mean:
- RMSNorm: float32 mean of squares, ``x * rsqrt(var + eps)`` rounded to the input dtype, then
  times the weight (rounded again), as ``Qwen2RMSNorm``.
- residual add: ``x + residual`` rounded to the input dtype (what ``residual + hidden`` gives in
  bf16), then the RMSNorm of that sum; the sum is returned as the next residual.
- SiLU-and-multiply: ``silu(gate)`` rounded, times ``up``, rounded (``act_fn(gate) * up``).

Two implementations of the same three functions: ``TRITON`` (kernels written here, CUDA with
Triton installed; the GPU machine has Triton 3.6) and ``REFERENCE`` (plain torch, the same
rounding steps: the specification the kernels are checked against, and the way the fused layer
loop is tested on a CPU). ``select_ops`` picks one for a device; without CUDA or Triton the
decoder keeps transformers' own modules. Why hand-written kernels rather than torch.compile or a
kernel library: docs/model.md ("Fused small kernels").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

try:  # Triton is optional: CPU machines and CI run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

MODES = ("auto", "triton", "reference", "off")


@dataclass(frozen=True)
class FusedOps:
    """rms_norm(x, w, eps) -> y; add_rms_norm(x, residual, w, eps) -> (y, x + residual);
    silu_mul(gate, up) -> silu(gate) * up. Tensors [..., n], last dimension contiguous."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- reference (torch)


def _ref_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * y


def _ref_add_rms_norm(x, residual, w, eps):
    total = residual + x
    return _ref_rms_norm(total, w, eps), total


def _ref_silu_mul(gate, up):
    return F.silu(gate) * up


REFERENCE = FusedOps("reference", _ref_rms_norm, _ref_add_rms_norm, _ref_silu_mul)


# ---------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        sum_ptr,
        n_cols,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row per program: [x (+ residual) -> sum], y = w * round(sum * rsqrt(mean(sum^2) + eps))."""
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row + cols, out, mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().view(-1, x.shape[-1])


def _launch_norm(x, residual, w, eps):
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x2)
    total = torch.empty_like(x2) if residual is not None else out
    res2 = _rows(residual) if residual is not None else x2
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        w,
        out,
        total,
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out.view(x.shape), total.view(x.shape)


def _triton_rms_norm(x, w, eps):
    return _launch_norm(x, None, w, eps)[0]


def _triton_add_rms_norm(x, residual, w, eps):
    return _launch_norm(x, residual, w, eps)


def _triton_silu_mul(gate, up):
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](g, u, out, n, BLOCK=block, num_warps=8)
    return out


TRITON = (
    FusedOps("triton", _triton_rms_norm, _triton_add_rms_norm, _triton_silu_mul)
    if triton is not None
    else None
)


# ---------------------------------------------------------------------- selection


def triton_usable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the Triton kernels can run for `device`/`dtype`, else why not."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return f"the kernels need CUDA (device {device})"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"no kernels for {dtype}"
    return None


def layers_fusable(layers) -> str | None:
    """None if every layer is the Qwen2 shape the fused loop rebuilds (RMSNorm -> attention -> add ->
    RMSNorm -> SiLU-gated MLP -> add), else why not."""
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        parts = (
            getattr(layer, "self_attn", None),
            getattr(getattr(layer, "input_layernorm", None), "variance_epsilon", None),
            getattr(getattr(layer, "post_attention_layernorm", None), "variance_epsilon", None),
            *(getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")),
        )
        if any(p is None for p in parts):
            return f"layer {i} ({type(layer).__name__}) is not a Qwen2 decoder layer"
        act = getattr(getattr(mlp, "config", None), "hidden_act", None)
        if act != "silu":
            return f"layer {i}'s MLP activation is {act!r}, not SiLU"
        if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i}'s MLP has biases"
    return None


def select_ops(mode: str, device: torch.device, dtype: torch.dtype, layers) -> tuple[FusedOps | None, str]:
    """(ops or None for transformers' modules, why) for fused mode `mode` (one of MODES).

    auto: the Triton kernels where they run (CUDA, Triton installed, Qwen2 layers), else None;
    triton: the kernels or ValueError; reference: the torch reference ops (checks, CPU tests);
    off: None.
    """
    if mode not in MODES:
        raise ValueError(f"fused must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None, "off"
    why = layers_fusable(layers)
    if why is None and any(layer.input_layernorm.weight.dtype != dtype for layer in layers):
        why = f"the norm weights are not {dtype}"
    if mode != "reference" and why is None:
        why = triton_usable(device, dtype)
    if why is not None:
        if mode == "auto":
            return None, why
        raise ValueError(f"fused={mode!r} cannot run: {why}")
    ops = REFERENCE if mode == "reference" else TRITON
    return ops, ops.name
