"""bench --profile (bench/trace.py): GPU busy time is the union of the device intervals in
the denoising loop's range, idle the rest; launches are counted per step. The summary is
checked on a hand-made trace with known answers, and the whole path on a real CPU run."""

from __future__ import annotations

import json

import pytest

from sdtrt.bench.benchmark import BenchConfig, run_bench
from sdtrt.bench.report import markdown_table
from sdtrt.bench.trace import LOOP_RANGE, summarize, union_length


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_union_counts_overlaps_once():
    assert union_length([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert union_length([(3, 4)]) == 1 and union_length([]) == 0


def test_summary_of_a_launch_bound_loop():
    """Two steps in a 1000 us loop: kernels overlapping (busy counted once), a memcpy, one
    kernel ending after the loop (clipped), one kernel before it (not counted)."""
    events = [
        _event("user_annotation", LOOP_RANGE, 100, 1000),
        _event("kernel", "before", 0, 50),
        _event("kernel", "conv", 100, 200),
        _event("kernel", "gemm", 250, 100),  # overlaps conv by 50
        _event("gpu_memcpy", "Memcpy DtoD", 500, 100),
        _event("kernel", "last", 1000, 300),  # 100 of it inside
        *(_event("cuda_runtime", "cudaLaunchKernel", 100 + 10 * i, 5) for i in range(4)),
        _event("cuda_runtime", "cudaGraphLaunch", 700, 5),
        _event("cuda_runtime", "cudaMemcpyAsync", 490, 5),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 400},  # no duration: ignored
    ]
    s = summarize(events, steps=2)
    assert s["window"] == "denoising loop" and s["window_ms"] == pytest.approx(1.0)
    assert s["gpu_busy_ms"] == pytest.approx((250 + 100 + 100) / 1e3)
    assert s["gpu_idle_ms"] == pytest.approx(0.55) and s["gpu_busy_fraction"] == pytest.approx(0.45)
    assert s["kernels_per_step"] == 1.5  # conv, gemm, last
    assert s["kernel_launches_per_step"] == 2 and s["graph_launches_per_step"] == 0.5


def test_without_device_events_or_a_loop_range():
    s = summarize([_event("cpu_op", "aten::mm", 10, 30), _event("cpu_op", "x", 50, 10)], 3)
    assert s["window"] == "whole run" and s["window_ms"] == pytest.approx(0.05)
    assert s["gpu_busy_ms"] is None and s["kernels_per_step"] is None


def test_bench_profile_writes_a_trace_per_row(tiny, tmp_path, monkeypatch):
    """On the CPU: a real trace per row, the loop's range found in it, no GPU figures."""
    monkeypatch.setattr("sdtrt.models.load_components", lambda source: tiny)
    config = BenchConfig(
        backends=("torch", "diffusers"), batches=(1, 2), height=32, width=32, steps=4,
        warmup=0, repeats=1, profile=str(tmp_path / "traces"),
    )  # fmt: skip
    record = run_bench(config, log=lambda line: None)
    rows = [(b, n) for b in ("torch", "diffusers") for n in (1, 2)]
    for row, (backend, batch) in zip(record["results"], rows, strict=True):
        p = row["profile"]
        window = "denoising loop" if backend == "torch" else "whole run"  # diffusers': no range
        assert p["window"] == window and p["steps"] == row["unet_calls"] == 3
        assert 0 < p["window_ms"] and p["gpu_busy_ms"] is None
        trace = json.loads((tmp_path / "traces" / f"{backend}-b{batch}.trace.json").read_text())
        assert any(e.get("name") == "aten::convolution" for e in trace["traceEvents"])
    assert not list((tmp_path / "traces").glob(".*partial"))
    table = markdown_table(record)
    assert "| torch | 2 | denoising loop |" in table and "torch-b2.trace.json |" in table
