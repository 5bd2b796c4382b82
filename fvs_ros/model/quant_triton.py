"""Triton kernels for the 8-bit paths (quant.py): int8 weight-only matmuls of a few rows (decode
steps, short questions), y = x @ (q * scale).T, and fp8's per-token activation quantization.

cuBLAS has no bf16 x int8 GEMM, and dequantizing the weight first writes and reads a bf16 copy
(5 bytes moved per weight instead of 2), which makes decode slower than bf16. This kernel reads
each int8 weight once, converts it in registers and accumulates in float32, so a decode step
moves about half the bytes of bf16. Each program computes a BLOCK_N slice of the output for 16
rows; the output scale is applied once at the end. Imported only where Triton is
installed (the CUDA machines); quant.py falls back to cuBLAS without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tl.dot's smallest M; rows beyond x's are masked


@triton.jit
def _int8_wo_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0
        )
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0
        )
        acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    y = acc * scale[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def int8_weight_only_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16), q [N, K] int8 (contiguous), scale [N] float32 -> [M, N] in x's dtype.
    Each 16 rows of x read the weight once more: meant for M up to a few dozen (quant.TRITON_MAX_ROWS)."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = 32 if n >= 8192 else 16  # enough programs to keep every SM reading for the small layers
    _int8_wo_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))](
        x, q, scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=256, num_warps=4,
    )  # fmt: skip
    return y


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        tl.store(
            q_ptr + row * stride_q + k0 + offs, (x / scale).to(q_ptr.dtype.element_ty), mask=k0 + offs < K
        )


def fp8_rows(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic FP8 quantization in one kernel (two reads of x, one fp8 write): x [M, K] ->
    (q [M, K] float8_e4m3fn, scale [M, 1] float32) with x ~= q * scale. The same arithmetic as
    quant.QuantLinear._fp8's PyTorch ops (float32 absmax / fp8_max, float32 divide, round to e4m3),
    which take ~6 passes over x."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), FP8_MAX=fp8_max, BLOCK=1024, num_warps=4)
    return q, scale
