"""What the stream's previews cost: one request's time through the step batcher without
previews, with previews decoded by the model's VAE, and by a TAESD (``--preview-vae``),
after every 5th and every step, in one process.

    python -m sdtrt.bench.preview_ab --size 256

Tiny model, torch fp32 on the CPU: one request of 20 steps at strength 1, the runs
alternating, medians over repeats after a warm-up round; the TAESD is the tiny model's own
(sdtrt/assets/tiny-taesd).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import PIL.Image

from sdtrt.options import SAMPLE_IMAGE
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest
from sdtrt.serve.options import ServeOptions

STEPS = 20
TAESD = str(SAMPLE_IMAGE.parent / "tiny-taesd")


def one_request(batcher: StepBatcher, image: PIL.Image.Image, every: int) -> float:
    """Milliseconds for one request with a preview after every ``every``-th step (0: none)."""
    job = batcher.prepare(Img2ImgRequest(image=image, num_inference_steps=STEPS, strength=1.0))
    job.progress = lambda done, steps, previews=None: None
    job.preview_steps = frozenset(range(every, STEPS, every) if every else ())
    start = time.perf_counter()
    batcher.submit(job).result(timeout=600)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8)
    image = PIL.Image.fromarray(pixels)
    batchers = {
        decoder: StepBatcher(
            Img2ImgPipeline.from_pretrained("tiny", show_progress=False),
            ServeOptions(preview_vae=decoder),
        )
        for decoder in (None, TAESD)
    }
    runs = {
        "no previews": (batchers[None], 0),
        "model's VAE, every 5th step": (batchers[None], 5),
        "model's VAE, every step": (batchers[None], 1),
        "TAESD, every 5th step": (batchers[TAESD], 5),
        "TAESD, every step": (batchers[TAESD], 1),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for name, (batcher, every) in runs.items():
            ms = one_request(batcher, image, every)
            if repeat:
                times[name].append(ms)
    for batcher in batchers.values():
        batcher.close()
    base = statistics.median(times["no previews"])
    print(f"tiny model {args.size}x{args.size}, {STEPS} steps, median of {args.repeats}:")
    print("| previews | ms per request | x no previews |\n| --- | ---: | ---: |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
