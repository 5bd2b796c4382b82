"""The tolerance rule of the GPU tests (pytest -m cuda): a bf16 fast path against transformers' own
bf16 path, both measured against float32.

Two correct bf16 implementations of one computation differ by their rounding, not by a fixed
amount: how much depends on the shapes, the depth and the kernels. So the reference is the same
computation in float32 (the same weights, TF32 off), and the fast path must be as accurate as
transformers' eager bf16 path: its error against float32 at most FACTOR times eager's, plus FLOOR
(one bf16 rounding, 2^-8, for results that eager happens to get almost exact). A real defect
(a wrong mask, position, cache slot, chunk bound or graph input) gives errors of order one.
"""

import torch

FACTOR = 2.0
FLOOR = 2.0**-8


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


def assert_as_accurate_as_eager(
    fast: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, what: str
) -> None:
    """fast (bf16 fast path) is as close to truth (float32) as eager (bf16 transformers) is."""
    e_fast, e_eager = rel_err(fast, truth), rel_err(eager, truth)
    bound = FACTOR * e_eager + FLOOR
    assert e_fast <= bound, (
        f"{what}: fast error {e_fast:.3g} vs float32 > {bound:.3g} (eager bf16 {e_eager:.3g})"
    )


def no_tf32() -> None:
    """float32 references in float32: TF32 matmuls / convolutions round to 10 mantissa bits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
