"""CudaGraphed's bookkeeping (engine/cuda_graphs.py), captures faked on the CPU: one graph
per input shapes and dtypes, inputs copied in and the output cloned out, at most
``max_captures`` kept (the least recently used goes). The real capture is tested on a GPU
(tests/test_gpu.py::test_torch_cuda_graph_replay_equals_plain_run)."""

from __future__ import annotations

import torch

from sdtrt.engine import cuda_graphs


class _Graph:
    """A CUDA graph's stand-in: a replay computes the captured call again into the output
    the capture returned, as a real replay rewrites the same memory."""

    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        self.output.copy_(self.fn())


def test_graphs_per_shape_and_dtype_least_recently_used_dropped(monkeypatch):
    captures, pools = [], set()

    def fake_capture(fn, pool):
        output = fn()
        captures.append(output.shape)
        pools.add(id(pool))
        return _Graph(fn, output), output

    monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
    monkeypatch.setattr(cuda_graphs.CudaGraphed, "max_captures", 2)
    graphed = cuda_graphs.CudaGraphed(lambda x, y: x * 2 + y)
    generator = torch.Generator().manual_seed(0)

    def call(shape, dtype=torch.float32):
        x = torch.randn(shape, generator=generator).to(dtype)
        y = torch.randn(shape, generator=generator).to(dtype)
        got = graphed(x, y)
        torch.testing.assert_close(got, x * 2 + y, rtol=0, atol=0)
        again = graphed(x, y)  # a second replay must not change what the first returned
        torch.testing.assert_close(got, again, rtol=0, atol=0)
        assert got.data_ptr() != again.data_ptr()
        return len(captures)

    assert call((2, 3)) == 1
    assert call((2, 3)) == 1  # same shape, new values: replayed, not captured
    assert call((4, 3)) == 2
    assert call((2, 3), torch.float64) == 3  # a dtype is a key of its own
    assert len(graphed.graphs) == 2  # (2, 3) float32 went: the least recently used
    assert call((4, 3)) == 3  # still kept
    assert call((2, 3)) == 4  # captured again
    assert len(pools) == 1  # every capture in the one memory pool
