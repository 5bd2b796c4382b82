"""CUDA-graph replay of a fixed-shape step: the memory's per-frame update once its bank is full.

A one-frame update is about 175 small kernels; launched from Python they cost several times the
GPU work. Captured once in a CUDA graph, they are launched with one call (docs/memory.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fvs_ros.cuda_graph import capture


class StepGraph:
    """step(*inputs), captured once and replayed with new inputs.

    step must use device ops only (no host reads) and write its results in place into tensors
    that outlive the graph; its inputs must keep their shapes, dtypes and device.
    """

    def __init__(self, step: Callable[..., None], inputs: Sequence[Tensor]):
        """Runs step(*inputs) once for real (the warm-up torch advises before a capture), then
        captures step reading static copies of the inputs. A capture runs no kernel, so step's
        effect happens exactly once. Raises cuda_graph.CaptureError if the capture fails; errors
        of the warm-up itself propagate as they are."""
        self._inputs = [x.clone() for x in inputs]  # replay reads its inputs here
        first = [inputs]  # the warm-up absorbs the real frame; the capture records the static copies

        def run():
            step(*(first.pop() if first else self._inputs))

        self._graph, _ = capture(run, inputs[0].device, warmups=1)

    def replay(self, *inputs: Tensor) -> None:
        """step(*inputs) on the current stream."""
        for static, x in zip(self._inputs, inputs):
            static.copy_(x)
        self._graph.replay()
