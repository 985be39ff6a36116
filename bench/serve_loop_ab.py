"""``sdtrt serve`` with a request's image decoding, preprocessing and PNG encoding off the
event loop (threads) against on it (the behaviour before), in one process: how long a
/health probe waits while img2img requests are served, and how long the requests take.

    python bench/serve_loop_ab.py [SIDE]

Tiny model, torch fp32 on the CPU, step batching: rounds of 8 concurrent requests (a
SIDE x SIDE PNG in, SIDE x SIDE out, default 512; 4 steps at strength 0.5), a probe
GETting /health every 10 ms meanwhile; the two modes alternate, medians over 3 rounds after
a warm-up round.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import PIL.Image

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve import app as serve_app
from sdtrt.serve import handling
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.server import BackgroundServer

REQUESTS, REPEATS = 8, 3


async def on_loop(executor: Any, work: Callable[..., Any], *args: Any) -> Any:
    return work(*args)  # in the event loop's own thread, as before


def round_trip(url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """Wall ms for REQUESTS concurrent requests, and the /health latencies meanwhile."""
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client() as client:
            while not done.wait(0.01):
                start = time.perf_counter()
                client.get(f"{url}/health", timeout=30).raise_for_status()
                probes.append((time.perf_counter() - start) * 1e3)

    prober = threading.Thread(target=probe)
    prober.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(
            pool.map(
                lambda seed: httpx.post(
                    f"{url}/v1/img2img", json={**body, "seed": seed}, timeout=600
                ),
                range(REQUESTS),
            )
        )
    wall = (time.perf_counter() - start) * 1e3
    done.set()
    prober.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return wall, probes


def main(side: int) -> None:
    pipe = Img2ImgPipeline.from_pretrained("tiny", show_progress=False)
    pixels = np.random.default_rng(0).integers(0, 256, (side // 16, side // 16, 3), np.uint8)
    image = PIL.Image.fromarray(pixels).resize(
        (side, side), PIL.Image.Resampling.BICUBIC
    )  # photo-like
    png = io.BytesIO()
    image.save(png, format="PNG")
    body = {
        "image": base64.b64encode(png.getvalue()).decode(),
        "num_inference_steps": 4,
        "strength": 0.5,
    }
    off_loop = handling.off_loop
    modes = {"on the loop": on_loop, "off the loop": off_loop}
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    probes: dict[str, list[float]] = {mode: [] for mode in modes}
    options = ServeOptions()
    app = serve_app.create_app(StepBatcher(pipe, options), options, warmup=False)
    with BackgroundServer(app) as server:
        for repeat in range(REPEATS + 1):  # the first round is the warm-up
            for mode, helper in modes.items():
                serve_app.off_loop = handling.off_loop = helper  # the app's and the job's
                wall, waits = round_trip(server.url, body)
                if repeat:
                    walls[mode].append(wall)
                    probes[mode] += waits
    serve_app.off_loop = handling.off_loop = off_loop
    print(f"{REQUESTS} concurrent requests, {side}x{side} in and out, {REPEATS} rounds each")
    for mode in modes:
        waits = sorted(probes[mode])
        p99 = waits[int(0.99 * (len(waits) - 1))]
        slow = sum(wait > 50 for wait in waits)
        print(
            f"{mode}: round {statistics.median(walls[mode]):.0f} ms; /health p50 "
            f"{statistics.median(waits):.1f} ms, p99 {p99:.1f}, max {waits[-1]:.1f}, "
            f"{slow} of {len(waits)} over 50 ms"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
