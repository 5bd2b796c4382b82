"""CUDA-graph replay of the memory's per-frame update once its bank is full (docs/memory.md).

A one-frame update is about 130 small kernels; launched from Python they cost several times the
GPU work. Captured in CUDA graphs, they are launched with a few calls. The step is split around
the Lloyd loop because a graph cannot stop early: the head graph ends with the first Lloyd
iteration, then the host reads the convergence flag and replays a one-iteration tail graph only
while Lloyd has not converged (rare: after the warm start the first iteration converges, unless
rounding decides a near-tie).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fvs_ros.common.cuda_graph import CaptureError, capture


class StepGraph:
    """step(), captured once and replayed. step must use device ops only (no host reads) on
    tensors that outlive the graph, reading its inputs from them and writing its results into
    them in place."""

    def __init__(self, step: Callable[[], None], device: torch.device):
        """Runs step() once for real (the warm-up torch advises before a capture), then captures
        it. A capture runs no kernel, so step's effect happens exactly once. Raises
        cuda_graph.CaptureError if the capture fails; errors of the warm-up propagate as they are."""
        self._graph, _ = capture(step, device, warmups=1)

    def replay(self) -> None:
        """step() on the current stream."""
        self._graph.replay()


class SplitStep:
    """One frame's step as graphs: head; tail (one Lloyd iteration) while `done` is false, at most
    `tail_max` times; finish.

    Capturing absorbs the current frame: each graph's capture runs its stage once for real, and the
    frame runs the whole step (tail `tail_max` times: iterations after convergence change nothing).
    If a capture fails, the rest of the step runs eagerly (the frame is still absorbed exactly once)
    and the CaptureError propagates.
    """

    def __init__(
        self,
        head: Callable[[], None],
        tail: Callable[[], None],
        tail_max: int,
        finish: Callable[[], None],
        done: Tensor,
        device: torch.device,
    ):
        stages = [head, *[tail] * tail_max, finish]
        graphs: dict[Callable[[], None], StepGraph] = {}
        for i, stage in enumerate(stages):
            if stage in graphs:  # a repeated tail iteration
                stage()
                continue
            try:
                graphs[stage] = StepGraph(stage, device)
            except CaptureError:
                for rest in stages[i + 1 :]:
                    rest()
                raise
        self._head, self._tail, self._finish = graphs[head], graphs.get(tail), graphs[finish]
        self._tail_max, self._done = tail_max, done

    def replay(self) -> int:
        """One frame on the current stream; returns how many tail replays it took. Each read of
        `done` waits for the graphs replayed before it."""
        self._head.replay()
        n = 0
        while n < self._tail_max and not bool(self._done):
            self._tail.replay()
            n += 1
        self._finish.replay()
        return n
