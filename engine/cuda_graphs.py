"""Replay a GPU call as a CUDA graph: captured once per input shape after a warm run.

The Python and launch overhead of a UNet call (hundreds of kernels) disappears on replay.
Inputs are copied into the captured static tensors; the output is cloned out, because the
next replay overwrites it. The captures of one ``CudaGraphed`` (one per shape) share one
memory pool, as vLLM's per-batch-size graphs do: replays run one at a time on one stream
and each graph's output stays allocated, so a graph's activations may take the memory of
another's; private pools would hold every shape's activations at once (a server with
``--max-rows 16`` captures up to 16 row counts per image size). Capture and replay run
in inference mode, as the pipeline does, whoever calls: the static tensors are inference
tensors, which only inference mode may write.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class Captures(Generic[T]):
    """Captured graphs by key, at most ``limit`` of them: each holds its own GPU memory (the
    activations of its shapes), so beyond the limit the least recently used one goes, as a
    server seeing many shapes would otherwise keep them all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, key: Hashable, capture: Callable[[], T], fits: Callable[[T], bool] = lambda _: True
    ) -> T:
        """The entry for ``key``, captured first where there is none or it does not ``fit``."""
        entry = self._entries.get(key)
        if entry is None or not fits(entry):
            entry = self._entries[key] = capture()
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry


class MemoryPool:
    """One CUDA graph memory pool for several captures, made at the first of them."""

    def __init__(self) -> None:
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


class CudaGraphed:
    """``fn`` on tensors, replayed as a CUDA graph per input shapes and dtypes (at most
    ``max_captures`` kept)."""

    # The server's working set: its batcher forms any row count up to --max-rows (16) per
    # image size, and a capture dropped and taken again costs two UNet calls.
    max_captures = 32

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.pool = MemoryPool()
        self.graphs: Captures[tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]]
        self.graphs = Captures(self.max_captures)

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        graph, static_inputs, static_output = self.graphs.get(key, lambda: self._capture(inputs))
        for static, tensor in zip(static_inputs, inputs, strict=True):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return static_output.clone()

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        static_inputs = [t.clone() for t in inputs]
        graph, static_output = capture(lambda: self.fn(*static_inputs), self.pool)
        return graph, static_inputs, static_output


def capture(fn: Callable[[], T], pool: MemoryPool) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` run once, then captured: the graph and what the captured call returned (its
    tensors are where each replay writes). ``pool``: the memory pool it shares with other
    captures, safe where they replay one at a time on one stream and what each returns
    stays allocated."""
    # Warm run on a side stream: lazy initialisation (cuBLAS handles, TensorRT's first
    # enqueue) must not happen during capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool.handle()):
        output = fn()
    return graph, output
