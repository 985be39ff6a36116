"""The step batcher with shared scheduler memos against each request's scheduler starting
with an empty memo (the behaviour before they were shared), in one process.

    python bench/serve_memo_ab.py lms dpmpp_2m unipc euler_a

Tiny model, torch fp32 on the CPU, 64x64: 4 concurrent requests of 50 steps at strength
0.8 (40 UNet calls of 8 rows), the two modes alternating, median of 5 after a warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np
import PIL.Image

from sdtrt.runtime import scheduler_memo
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest, JobResult

REQUESTS, STEPS, STRENGTH, REPEATS = 4, 50, 0.8, 5


def load(
    pipe: Img2ImgPipeline, image: PIL.Image.Image, scheduler: str
) -> tuple[float, list[JobResult]]:
    batcher = StepBatcher(pipe, start=False)
    futures = [
        batcher.submit(
            batcher.prepare(
                Img2ImgRequest(
                    image=image,
                    strength=STRENGTH,
                    num_inference_steps=STEPS,
                    seed=i,
                    scheduler=scheduler,
                )
            )
        )
        for i in range(REQUESTS)
    ]
    start = time.perf_counter()
    batcher.start()
    results: list[JobResult] = [f.result(timeout=600) for f in futures]
    ms = (time.perf_counter() - start) * 1e3
    batcher.close()
    return ms, results


def new_memo(key: Any) -> dict[Any, Any]:
    return {}


def main(schedulers: list[str]) -> None:
    shared = scheduler_memo.shared_memo
    pipe = Img2ImgPipeline.from_pretrained("tiny", show_progress=False)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    for scheduler in schedulers:
        times: dict[str, list[float]] = {"shared": [], "cold": []}
        arrays: dict[str, list[np.ndarray]] = {}
        shared.cache_clear()
        for repeat in range(REPEATS + 1):  # the first round is the warm-up
            for mode in times:
                # cold: a memo of its own for every scheduler, as before they were shared
                memo = shared if mode == "shared" else new_memo
                scheduler_memo.shared_memo = memo  # type: ignore[assignment]  # a plain function
                ms, results = load(pipe, image, scheduler)
                arrays[mode] = [r.array for r in results]
                if repeat:
                    times[mode].append(ms)
        same = all(map(np.array_equal, arrays["shared"], arrays["cold"]))
        cold_ms, shared_ms = (statistics.median(times[m]) for m in ("cold", "shared"))
        print(
            f"{scheduler}: cold memos {cold_ms:.0f} ms, shared {shared_ms:.0f} ms, "
            f"{cold_ms / shared_ms:.2f}x; images equal: {same}"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["lms"])
