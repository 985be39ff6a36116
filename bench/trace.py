"""Where a run's time goes on the GPU: one run under ``torch.profiler``, its trace written for
Perfetto or chrome://tracing, and summed up as GPU busy time against the gaps between
kernels, inside the denoising loop (sdtrt's pipeline marks it) or the whole run (diffusers').

The summary reads the trace's own categories (Kineto's: ``kernel``, ``gpu_memcpy``,
``gpu_memset`` on the device; ``cuda_runtime``/``cuda_driver`` calls on the host;
``user_annotation`` for ``record_function`` ranges), as Holistic Trace Analysis does: GPU
busy is the union of device intervals, idle is the window minus busy. A launch-bound loop
shows large idle time and one kernel launch per kernel; a graph-replayed one, one graph
launch per step and idle time near zero.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from sdtrt.bench.timing import synchronize
from sdtrt.fileio import atomic_path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
# The range sdtrt's pipeline records around its denoising loop (runtime/pipeline.py).
LOOP_RANGE = "sdtrt.denoise"


def profiled(run: Callable[[], int], device: torch.device, path: Path) -> dict[str, Any]:
    """``run`` (returning its UNet calls) once under the profiler; the trace goes to ``path``
    (written whole, then renamed into place) and its summary is returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        unet_calls = run()
        synchronize(device)
    with atomic_path(path) as partial:
        prof.export_chrome_trace(str(partial))
    summary = summarize(json.loads(path.read_text())["traceEvents"], unet_calls)
    return {**summary, "trace": str(path)}


def summarize(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """GPU busy and idle time in the loop's window (else the whole trace), and launches per
    step. Times in ms; the GPU fields are None where the trace has no device events."""
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    loop = [e for e in timed if e.get("cat") == "user_annotation" and e["name"] == LOOP_RANGE]
    if loop:
        start, end = loop[0]["ts"], loop[0]["ts"] + loop[0]["dur"]
        window = "denoising loop"
    else:
        start = min((e["ts"] for e in timed), default=0.0)
        end = max((e["ts"] + e["dur"] for e in timed), default=0.0)
        window = "whole run"

    def inside(e: dict[str, Any]) -> bool:
        return bool(start <= e["ts"] < end)

    device = [e for e in timed if e.get("cat") in DEVICE_CATEGORIES and inside(e)]
    host = [e for e in timed if e.get("cat") in ("cuda_runtime", "cuda_driver") and inside(e)]
    window_ms = (end - start) / 1e3
    steps = max(steps, 1)
    summary: dict[str, Any] = {
        "window": window,
        "window_ms": window_ms,
        "steps": steps,
        "gpu_busy_ms": None,
        "gpu_idle_ms": None,
        "gpu_busy_fraction": None,
        "kernels_per_step": None,
        "kernel_launches_per_step": None,
        "graph_launches_per_step": None,
    }
    if not device:
        return summary
    # Busy time is clipped to the window: a kernel launched inside may end after it.
    busy = union_length((e["ts"], min(e["ts"] + e["dur"], end)) for e in device) / 1e3
    kernels = sum(e.get("cat") == "kernel" for e in device)
    return {
        **summary,
        "gpu_busy_ms": busy,
        "gpu_idle_ms": window_ms - busy,
        "gpu_busy_fraction": busy / window_ms if window_ms else None,
        "kernels_per_step": kernels / steps,
        "kernel_launches_per_step": sum(e["name"] in KERNEL_LAUNCHES for e in host) / steps,
        "graph_launches_per_step": sum(e["name"] in GRAPH_LAUNCHES for e in host) / steps,
    }


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total
