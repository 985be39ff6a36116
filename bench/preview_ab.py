"""What the stream's previews cost: one request's time through the step batcher without
previews, with previews decoded by the model's VAE, and by a TAESD (``--preview-vae``),
after every 5th and every step, in one process.

    python -m sdtrt.bench.preview_ab --size 256
    python -m sdtrt.bench.preview_ab --model sd15-random --device cuda --dtype fp16 --size 512

One request of ``--steps`` steps at strength 1 at a time, the runs alternating, medians
over repeats after a warm-up round; torch backend, fp32 on the CPU unless told otherwise.
The TAESD is the tiny model's own (sdtrt/assets/tiny-taesd) for ``tiny``, else TAESD's
architecture with random weights (the same work, so the same time: bench/vae_ab.py's).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from sdtrt.bench.vae_ab import random_taesd
from sdtrt.options import SAMPLE_IMAGE, TorchOptions
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest
from sdtrt.serve.options import ServeOptions

TINY_TAESD = str(SAMPLE_IMAGE.parent / "tiny-taesd")


def one_request(batcher: StepBatcher, image: PIL.Image.Image, steps: int, every: int) -> float:
    """Milliseconds for one request with a preview after every ``every``-th step (0: none)."""
    job = batcher.prepare(Img2ImgRequest(image=image, num_inference_steps=steps, strength=1.0))
    job.progress = lambda done, steps, previews=None: None
    job.preview_steps = frozenset(range(every, steps, every) if every else ())
    start = time.perf_counter()
    batcher.submit(job).result(timeout=600)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    args = parser.parse_args()
    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8)
    image = PIL.Image.fromarray(pixels)
    options = TorchOptions(device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        taesd = TINY_TAESD if args.model == "tiny" else str(random_taesd(Path(scratch) / "t"))
        batchers = {
            decoder: StepBatcher(
                Img2ImgPipeline.from_pretrained(args.model, options, show_progress=False),
                ServeOptions(preview_vae=decoder),
            )
            for decoder in (None, taesd)
        }
    runs = {
        "no previews": (batchers[None], 0),
        "model's VAE, every 5th step": (batchers[None], 5),
        "model's VAE, every step": (batchers[None], 1),
        "TAESD, every 5th step": (batchers[taesd], 5),
        "TAESD, every step": (batchers[taesd], 1),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for name, (batcher, every) in runs.items():
            ms = one_request(batcher, image, args.steps, every)
            if repeat:
                times[name].append(ms)
    for batcher in batchers.values():
        batcher.close()
    base = statistics.median(times["no previews"])
    print(
        f"{args.model} {args.size}x{args.size} {args.device} {args.dtype}, {args.steps} steps, "
        f"median of {args.repeats}:"
    )
    print("| previews | ms per request | x no previews |\n| --- | ---: | ---: |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
