"""What priority levels do under load (``sdtrt serve --priority-levels 2``): the same
open-loop Poisson arrivals, a share of them sent with ``priority`` 1, against a server with
two levels and one without (where every request is alike), one after the other, repeated.

    python -m sdtrt.bench.priority_ab [--model tiny] [--rate 40] [--requests 48]
        [--urgent 0.25] [--max-rows 4] [--repeats 3] [--json out.json]

The load is past what the server answers (``--rate`` above its throughput), so requests
queue: that is where the order of admission shows. Reported per run and class (urgent, the
rest): the latency's median and p90, and the mean queue wait (X-Queue-Wait-Ms); then the
medians over the repeats and the ratios: urgent to the rest with levels, and the urgent
requests with levels to the same requests without. A warm-up round on each server comes
first and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np

from sdtrt.serve.loadgen import _sample_png


def _bodies(requests: int, urgent: float, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Arrival offsets (s, at rate 1: scaled by the caller) and request bodies; the urgent
    ones carry ``priority`` 1 (sent, or dropped for the server without levels)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, requests)
    image = _sample_png()
    bodies = []
    for index in range(requests):
        bodies.append(
            {
                "prompt": "a red circle on a blue background",
                "image": image,
                "num_inference_steps": 20,
                "strength": 0.6,
                "seed": index,
                "height": 64,
                "width": 64,
                "urgent": bool(rng.random() < urgent),
            }
        )
    return np.cumsum(gaps), bodies


async def _drive(
    url: str, arrivals: np.ndarray, bodies: list[dict[str, Any]], levels: bool
) -> list[dict[str, Any]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(at: float, body: dict[str, Any]) -> dict[str, Any]:
            sent_body = {k: v for k, v in body.items() if k != "urgent"}
            if levels and body["urgent"]:
                sent_body["priority"] = 1
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            answer = await client.post("/v1/img2img", json=sent_body)
            if answer.status_code != 200:
                raise RuntimeError(f"{answer.status_code}: {answer.text}")
            return {
                "urgent": body["urgent"],
                "latency_ms": (time.perf_counter() - sent) * 1e3,
                "wait_ms": float(answer.headers["x-queue-wait-ms"]),
            }

        return list(
            await asyncio.gather(*(one(a, b) for a, b in zip(arrivals, bodies, strict=True)))
        )


def _classes(answers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, urgent in (("urgent", True), ("rest", False)):
        rows = [a for a in answers if a["urgent"] == urgent]
        latencies = [a["latency_ms"] for a in rows]
        out[name] = {
            "requests": len(rows),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p90_ms": float(np.percentile(latencies, 90)),
            "wait_ms": statistics.fmean(a["wait_ms"] for a in rows),
        }
    return out


def measure(
    model: str = "tiny",
    rate: float = 40.0,
    requests: int = 48,
    urgent: float = 0.25,
    max_rows: int = 4,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """The record: per server (levels, none) the runs' per-class figures, their medians,
    and the ratios."""
    from sdtrt.api import build_pipeline
    from sdtrt.serve.app import create_app
    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.options import ServeOptions
    from sdtrt.serve.server import BackgroundServer

    pipeline = build_pipeline(model, "torch", show_progress=False)
    offsets, bodies = _bodies(requests, urgent, seed)
    if not any(b["urgent"] for b in bodies) or all(b["urgent"] for b in bodies):
        raise ValueError("the draw gave one class only: change --urgent or --requests")
    arrivals = offsets / rate
    runs: dict[str, list[dict[str, Any]]] = {"levels": [], "none": []}
    servers = {}
    for name, count in (("levels", 2), ("none", 0)):
        options = ServeOptions(max_rows=max_rows, priority_levels=count, max_queue=4 * requests)
        servers[name] = BackgroundServer(create_app(StepBatcher(pipeline, options), options))
        servers[name].__enter__()
    try:
        for server in servers.values():
            server.wait_ready(timeout=600)
        for round_ in range(repeats + 1):  # round 0 warms up
            for name in runs:
                answers = asyncio.run(_drive(servers[name].url, arrivals, bodies, name == "levels"))
                if round_:
                    runs[name].append(_classes(answers))
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    medians = {
        name: {
            cls: {key: statistics.median(r[cls][key] for r in rows) for key in rows[0][cls]}
            for cls in ("urgent", "rest")
        }
        for name, rows in runs.items()
    }
    levels, none = medians["levels"], medians["none"]
    return {
        "config": {
            "model": model,
            "rate": rate,
            "requests": requests,
            "urgent": urgent,
            "max_rows": max_rows,
            "repeats": repeats,
            "steps": 20,
            "size": "64x64",
            "strength": 0.6,
        },  # fmt: skip
        "runs": runs,
        "medians": medians,
        "ratios": {
            "urgent/rest p50, with levels": levels["urgent"]["p50_ms"] / levels["rest"]["p50_ms"],
            "urgent p50, levels/none": levels["urgent"]["p50_ms"] / none["urgent"]["p50_ms"],
            "rest p50, levels/none": levels["rest"]["p50_ms"] / none["rest"]["p50_ms"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rate", type=float, default=40.0, help="offered requests/s")
    parser.add_argument("--requests", type=int, default=48, help="per run")
    parser.add_argument("--urgent", type=float, default=0.25, help="share sent with priority 1")
    parser.add_argument("--max-rows", type=int, default=4, help="the server's UNet rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the record here")
    args = parser.parse_args()
    record = measure(args.model, args.rate, args.requests, args.urgent, args.max_rows, args.repeats)
    for name, classes in record["medians"].items():
        for cls, row in classes.items():
            print(
                f"{name:6} {cls:6} {row['requests']:3.0f} requests: p50 {row['p50_ms']:7.0f} ms, "
                f"p90 {row['p90_ms']:7.0f} ms, mean queue wait {row['wait_ms']:7.0f} ms"
            )
    for what, ratio in record["ratios"].items():
        print(f"{what}: {ratio:.2f}x")
    if args.json:
        from sdtrt.fileio import write_json

        write_json(args.json, record)


if __name__ == "__main__":
    main()
