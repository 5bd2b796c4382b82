"""One way to capture a CUDA graph, shared by the fast decoder, the fast ViT and the memory."""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any], device: torch.device, pool=None, warmups: int = 2,
            reset: Callable[[], None] = lambda: None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run fn `warmups` times on a side stream (cuBLAS handles, autotuning, allocator), then capture it.

    reset() runs before every warm-up run and before the capture (restore inputs or state that fn
    changes). Returns (graph, what the captured fn returned: its static outputs). Replay with
    graph.replay() on any stream of `device`. pool: share a memory pool with graphs captured before
    (graph.pool()); graphs sharing one must never replay concurrently.
    """
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            reset()
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (the engine's other worker) may keep using CUDA during the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs
