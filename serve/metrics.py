"""The server's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import JobResult


class Metrics:
    def __init__(self, batcher: StepBatcher) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "sdtrt_requests", "img2img requests by HTTP status", ["status"], registry=registry
        )
        self.images = Counter(
            "sdtrt_images", "images answered (num_images_per_prompt per request)", registry=registry
        )
        self.latency = Histogram(
            "sdtrt_request_latency_seconds",
            "img2img request latency, arrival to answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sdtrt_queue_wait_seconds",
            "time from arrival to admission into the batch",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
            registry=registry,
        )
        self.stages = Histogram(
            "sdtrt_stage_seconds",
            "a request's time in each stage: the batched calls it took part in",
            ["stage"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=registry,
        )
        self.rows = Histogram(
            "sdtrt_unet_rows_per_call",
            "UNet rows ([uncond, cond] per guided image) per batched call",
            buckets=(1, 2, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        )
        queue = Gauge("sdtrt_queue_depth", "requests waiting for admission", registry=registry)
        queue.set_function(lambda: len(batcher.waiting))
        if batcher.priority_levels:  # --priority-levels: how many wait at each level
            registry.register(_WaitingByLevel(batcher))
        active = Gauge("sdtrt_active_jobs", "requests being denoised", registry=registry)
        active.set_function(lambda: len(batcher.active))
        batcher.stats.on_unet_call.append(self.rows.observe)

    def answered(self, result: JobResult, seconds: float) -> None:
        """A request answered 200 after ``seconds``."""
        self.images.inc(len(result.images))
        self.latency.observe(seconds)
        self.queue_wait.observe(result.queue_wait_ms / 1e3)
        for stage, ms in result.timings_ms.items():
            if stage != "total":  # the request's latency, above
                self.stages.labels(stage).observe(ms / 1e3)


class _WaitingByLevel(Collector):
    """``sdtrt_queue_depth_by_priority{priority}``: the waiting requests of each level, read
    when scraped (every level shown, 0 where none waits)."""

    def __init__(self, batcher: StepBatcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "sdtrt_queue_depth_by_priority",
            "requests waiting for admission, by priority level (1 the highest)",
            labels=["priority"],
        )
        counts = dict.fromkeys(range(1, self.batcher.priority_levels + 1), 0)
        for job in list(self.batcher.waiting):  # a copy: the worker changes the queue
            counts[job.priority] += 1
        for level, count in counts.items():
            family.add_metric([str(level)], count)
        yield family
