"""One way to capture a CUDA graph, shared by the fast decoder, the fast ViT and the memory."""

from __future__ import annotations

from typing import Any, Callable

import torch


class CaptureError(Exception):
    """fn ran (its warm-up runs) but could not be captured."""


def capture(
    fn: Callable[[], Any],
    device: torch.device,
    pool=None,
    warmups: int = 2,
    reset: Callable[[], None] = lambda: None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run fn `warmups` times on a side stream (cuBLAS handles, autotuning, allocator), then capture it.

    reset() runs before every warm-up run and before the capture (restore inputs or state that fn
    changes; a capture itself runs no kernel). Returns (graph, what the captured fn returned: its
    static outputs); replay with graph.replay() on any stream of `device`. The side stream has the
    caller's stream priority, which the captured kernels keep on replay (torch instantiates graphs
    with node priorities): a graph captured on the engine's high-priority frame stream stays
    high-priority. pool: share a memory pool with graphs captured before (graph.pool()); graphs
    sharing one must never replay concurrently. Errors of the warm-up propagate as they are;
    errors of the capture raise CaptureError.
    """
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device, priority=current.priority)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            reset()
            fn()
    current.wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: other threads (the engine's other worker) may keep using CUDA meanwhile
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            outputs = fn()
    except Exception as e:  # noqa: BLE001 - the caller decides whether to run eagerly instead
        raise CaptureError(f"{type(e).__name__}: {e}") from e
    finally:
        torch.cuda.set_stream(current)  # torch.cuda.graph leaves its stream current if capture_end raises
    return graph, outputs
