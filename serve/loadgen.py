"""``sdtrt bench-serve``: an open-loop Poisson load against real servers on loopback,
comparing three batching policies of the same model in one run.

For each policy a server is started over the same loaded pipeline (one batcher each), warmed
up, then driven at each offered rate: requests are sent at exponential inter-arrival times
whatever the answers do (open loop: a saturated server shows as growing latency, not as a
slower client), with mixed strengths, seeds and, optionally, sizes. Bounded: at most
``requests`` per (policy, rate) and ``duration`` seconds of sending.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.errors import InvalidInputError
from sdtrt.options import SAMPLE_IMAGE, SCHEDULER_NAMES, BackendOptions, one_of
from sdtrt.serve.options import SERVE_POLICIES, ServeOptions
from sdtrt.source import ModelSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    rates: tuple[float, ...] = (2.0, 4.0, 8.0)
    """Offered load, requests per second."""
    requests: int = 30
    """Requests per (policy, rate)."""
    duration: float = 60.0
    """At most this many seconds of sending per (policy, rate); answers are awaited after."""
    policies: tuple[str, ...] = ("single", "request", "step")
    steps: int = 20
    strength: tuple[float, float] = (0.3, 1.0)
    """Each request's strength, uniform in this range."""
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    """(height, width) of each request, drawn uniformly."""
    guidance: float = 8.0
    guidance_cutoff: float | None = None
    """Each request's guidance cutoff (the share of its steps guided); None: sent none."""
    scheduler: str = "lms"
    """Each request's scheduler (lcm with a few steps at guidance 1: LCM-LoRA's load)."""
    queue_delay: float = 0.05
    """request policy: how long the oldest request waits for identical ones."""
    max_rows: int | None = None
    intra_op_threads: int | None = ServeOptions.intra_op_threads
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in SERVE_POLICIES]
        if unknown or not self.policies:
            raise InvalidInputError(
                f"policies must be some of {', '.join(SERVE_POLICIES)}, got {self.policies}"
            )
        if not self.rates or any(not r > 0 for r in self.rates):
            raise InvalidInputError(f"rates must be positive requests/s, got {self.rates}")
        if self.requests < 1 or not self.duration > 0:
            raise InvalidInputError("requests must be >= 1 and duration > 0 s")
        from sdtrt.runtime.guidance import check_guidance_cutoff

        one_of("scheduler", self.scheduler, SCHEDULER_NAMES)
        check_guidance_cutoff(self.guidance_cutoff)
        low, high = self.strength
        if not 0 < low <= high <= 1:
            raise InvalidInputError(f"strength range must be within (0, 1], got {low}-{high}")
        # The servers' own settings, checked now rather than after the model loads.
        ServeOptions(
            max_rows=self.max_rows,
            queue_delay=self.queue_delay,
            intra_op_threads=self.intra_op_threads,
        )


def run_load_bench(
    model: str | ModelSource,
    backend: BackendOptions | str,
    config: LoadConfig,
    url: str | None = None,
) -> dict[str, Any]:
    """Start one in-process server per policy and drive each; or, with ``url``, drive a
    server already running there (``sdtrt serve``, or Ray Serve's proxy in front of its
    replicas) as it is configured: one row per rate, labelled ``url``."""
    from sdtrt.bench.environment import environment

    image = _sample_png()
    record = {
        "config": {
            **asdict(config),
            "model": str(getattr(model, "model", model)),
            "backend": getattr(backend, "backend", backend),
            "url": url,
        },
        "environment": environment(),
    }
    if url is not None:
        headers = _check_server(url)
        results = []
        for rate in config.rates:
            logger.info("bench-serve: %s at %.2f req/s ...", url, rate)
            results.append(_measure(url, url, config, rate, image, None, headers))
        return {**record, "results": results}
    return {**record, "results": _policies(model, backend, config, image)}


def _check_server(url: str) -> dict[str, str]:
    """The headers to drive the server at ``url`` with (its API key, from the variable
    ``sdtrt serve`` reads it from), once it is seen to answer, be ready and take the key:
    otherwise every request of the run failed (a minute of 401s reported as a result)."""
    import httpx

    key = os.environ.get("SDTRT_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    try:
        ready = httpx.get(f"{url}/ready", timeout=10).status_code
        metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10).status_code
    except httpx.HTTPError as exc:
        raise InvalidInputError(f"--url {url}: no sdtrt server answers there ({exc})") from None
    if metrics == 401:
        given = "refused the key in $SDTRT_API_KEY" if key else "asks for an API key"
        raise InvalidInputError(f"--url {url}: the server {given}; set SDTRT_API_KEY to its key")
    if ready != 200 or metrics != 200:
        raise InvalidInputError(
            f"--url {url}: /ready answered {ready} and /metrics {metrics}, where an sdtrt "
            "server that is ready answers 200"
        )
    return headers


def _policies(
    model: str | ModelSource, backend: BackendOptions | str, config: LoadConfig, image: str
) -> list[dict[str, Any]]:
    from sdtrt.api import build_pipeline
    from sdtrt.serve.app import create_app
    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.server import BackgroundServer

    pipeline = build_pipeline(model, backend, show_progress=False)
    for height, width in config.sizes:  # refused here, not as 30 failed requests
        pipeline.output_size(None, height, width)
    results = []
    for policy in config.policies:
        options = ServeOptions(
            policy=policy,
            max_rows=config.max_rows,
            queue_delay=config.queue_delay,
            max_queue=10 * config.requests,
            intra_op_threads=config.intra_op_threads,
        )
        batcher = StepBatcher(pipeline, options)
        rows: list[int] = []
        batcher.stats.on_unet_call.append(rows.append)
        with BackgroundServer(create_app(batcher, options)) as server:
            server.wait_ready(timeout=600)
            for rate in config.rates:
                rows.clear()
                logger.info("bench-serve: %s at %.2f req/s ...", policy, rate)
                results.append(_measure(server.url, policy, config, rate, image, rows))
    return results


def _measure(
    url: str,
    label: str,
    config: LoadConfig,
    rate: float,
    image: str,
    rows: list[int] | None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    import psutil

    psutil.cpu_percent(None)  # the machine's CPU use from here on
    answers, elapsed = asyncio.run(_drive(url, config, rate, image, headers or {}))
    busy = psutil.cpu_percent(None)
    result = {**_summarise(label, rate, answers, elapsed, rows), "cpu_percent": busy}
    logger.info("bench-serve: %s", result)
    return result


async def _drive(
    url: str, config: LoadConfig, rate: float, image: str, headers: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    import httpx

    rng = np.random.default_rng(config.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, config.requests))
    arrivals = arrivals[arrivals <= config.duration]
    low, high = config.strength
    cutoff = {} if config.guidance_cutoff is None else {"guidance_cutoff": config.guidance_cutoff}
    bodies = [
        {
            "prompt": "a colourful dancer",
            "image": image,
            "num_inference_steps": config.steps,
            "strength": float(rng.uniform(low, high)),
            "seed": int(rng.integers(0, 2**31)),
            "guidance_scale": config.guidance,
            "scheduler": config.scheduler,
            "height": config.sizes[i][0],
            "width": config.sizes[i][1],
            **cutoff,
        }
        for i in rng.integers(0, len(config.sizes), len(arrivals))
    ]
    limits = httpx.Limits(max_connections=len(bodies) + 1)
    client = httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers)
    async with client:
        start = time.perf_counter()

        async def one(at: float, body: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            try:
                answer = await client.post("/v1/img2img", json=body)
                status = answer.status_code
                wait = float(answer.headers.get("x-queue-wait-ms", "nan"))
            except httpx.HTTPError as exc:
                status, wait = 0, float("nan")
                logger.warning("bench-serve: a request failed: %s", exc)
            done = time.perf_counter()
            return {"status": status, "latency": done - sent, "done": done - start, "wait": wait}

        answers = await asyncio.gather(*(one(a, b) for a, b in zip(arrivals, bodies, strict=True)))
    return list(answers), max((a["done"] for a in answers), default=0.0)


def _summarise(
    policy: str,
    rate: float,
    answers: list[dict[str, Any]],
    elapsed: float,
    rows: list[int] | None,
) -> dict[str, Any]:
    """``rows``: the UNet rows of each call the server made (None: not known from here)."""
    ok = [a for a in answers if a["status"] == 200]
    latencies = sorted(a["latency"] * 1e3 for a in ok)

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return float(np.percentile(latencies, q))

    waits = [a["wait"] for a in ok]
    return {
        "policy": policy,
        "offered_rps": rate,
        "requests": len(answers),
        "ok": len(ok),
        "errors": len(answers) - len(ok),
        "throughput_rps": len(ok) / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
        "queue_wait_ms_mean": statistics.fmean(waits) if waits else float("nan"),
        "unet_calls": len(rows) if rows is not None else None,
        "rows_per_call": statistics.fmean(rows) if rows else None,
    }


def _sample_png() -> str:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.open(SAMPLE_IMAGE).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def markdown_table(record: dict[str, Any]) -> str:
    lines = [
        "| policy | offered req/s | ok | errors | throughput req/s | p50 ms | p90 ms | p99 ms "
        "| mean queue wait ms | UNet calls | rows/call | CPU % |",
        "| --- |" + " ---: |" * 11,
    ]
    for r in record["results"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['policy']} | {r['offered_rps']:g} | {r['ok']} | {r['errors']} "
            f"| {r['throughput_rps']:.2f} | {lat['p50']:.0f} | {lat['p90']:.0f} "
            f"| {lat['p99']:.0f} | {r['queue_wait_ms_mean']:.0f} | {r['unet_calls'] or '-'} "
            f"| {_number(r['rows_per_call'])} | {r['cpu_percent']:.0f} |"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratios(record: dict[str, Any]) -> list[str]:
    """The comparisons the issue asks for, per offered rate: step vs one-at-a-time
    throughput, step vs request-level p99."""
    by = {(r["policy"], r["offered_rps"]): r for r in record["results"]}
    lines = []
    for rate in sorted({r["offered_rps"] for r in record["results"]}):
        step, single, request = (by.get((p, rate)) for p in ("step", "single", "request"))
        parts = [f"{rate:g} req/s:"]
        if step and single and single["throughput_rps"]:
            parts.append(
                f"step/single throughput {step['throughput_rps'] / single['throughput_rps']:.2f}x"
            )
        if step and request and request["latency_ms"]["p99"]:
            parts.append(
                f"step/request p99 {step['latency_ms']['p99'] / request['latency_ms']['p99']:.2f}x"
            )
        lines.append(" ".join(parts))
    return lines


def plot(record: dict[str, Any], path: str | Path) -> None:
    """Latency (p50 solid, p99 dashed) and throughput against offered load, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdtrt.bench.report import check_plot_path
    from sdtrt.fileio import atomic_path

    fmt = check_plot_path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in record["results"]):
        rows = [r for r in record["results"] if r["policy"] == policy]
        rates = [r["offered_rps"] for r in rows]
        (line,) = left.plot(rates, [r["latency_ms"]["p50"] for r in rows], "o-", label=policy)
        left.plot(rates, [r["latency_ms"]["p99"] for r in rows], "o--", color=line.get_color())
        right.plot(rates, [r["throughput_rps"] for r in rows], "o-", label=policy)
    left.set_xlabel("offered load, requests/s")
    left.set_ylabel("latency ms (p50 solid, p99 dashed)")
    left.set_yscale("log")
    left.legend()
    right.set_xlabel("offered load, requests/s")
    right.set_ylabel("served requests/s")
    right.legend()
    config = record["config"]
    fig.suptitle(
        f"sdtrt serve: {config['model']} on {config['backend']}, {config['steps']} steps, "
        f"strength {config['strength'][0]}-{config['strength'][1]}"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    plt.close(fig)
