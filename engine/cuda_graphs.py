"""Replay a GPU call as a CUDA graph: captured once per input shape after a warm run.

The Python and launch overhead of a UNet call (hundreds of kernels) disappears on replay.
Inputs are copied into the captured static tensors; the output is cloned out, because the
next replay overwrites it. Capture and replay run in inference mode, as the pipeline does,
whoever calls: the static tensors are inference tensors, which only inference mode may
write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]


class CudaGraphed:
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[Key, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = entry
        for static, tensor in zip(static_inputs, inputs, strict=True):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return static_output.clone()

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        static_inputs = [t.clone() for t in inputs]
        graph, static_output = capture(lambda: self.fn(*static_inputs))
        return graph, static_inputs, static_output


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` run once, then captured: the graph and what the captured call returned (its
    tensors are where each replay writes)."""
    # Warm run on a side stream: lazy initialisation (cuBLAS handles, TensorRT's first
    # enqueue) must not happen during capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output
