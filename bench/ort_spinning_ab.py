"""ONNX Runtime's worker threads spinning after each run, against sleeping: img2img end to
end on the CPU provider, both pipelines in one process, runs alternating.

    python bench/ort_spinning_ab.py [MODEL] [SIZE] [STEPS] [REPEATS]

With spinning on, each session's pool busy-waits for a while after its run, on the cores
that the PyTorch work between runs (the scheduler step, guidance, the image processor)
and the next network's session then need. ``ort_sweep`` times one network alone, where
spinning only saves the wake-up; this times the whole loop. Defaults: tiny, 128 px, 4
steps, 9 repeats after one warm-up run each; strength 1.0 (every step runs).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any


def main() -> None:
    import PIL.Image

    from sdtrt.api import build_pipeline
    from sdtrt.options import SAMPLE_IMAGE, SEED_PROMPT, OrtOptions
    from sdtrt.source import ModelSource

    defaults = ["tiny", "128", "4", "9"]
    model, size, steps, repeats = sys.argv[1:] + defaults[len(sys.argv) - 1 :]
    with PIL.Image.open(SAMPLE_IMAGE) as sample:
        image = sample.convert("RGB").resize((int(size), int(size)))
    sides = {"on": True, "off": False}
    pipes = {
        side: build_pipeline(
            ModelSource(model), OrtOptions(device="cpu", spinning=spin), show_progress=False
        )
        for side, spin in sides.items()
    }
    call: dict[str, Any] = {"num_inference_steps": int(steps), "strength": 1.0}
    for pipe in pipes.values():
        pipe(SEED_PROMPT, image, **call)  # warm-up
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(int(repeats)):
        for side, pipe in pipes.items():
            time.sleep(0.5)  # the other side's threads stop spinning (ORT spins for ms)
            start = time.perf_counter()
            pipe(SEED_PROMPT, image, **call)
            times[side].append((time.perf_counter() - start) * 1e3)
    median = {side: statistics.median(ms) for side, ms in times.items()}
    print(f"{model} {size}x{size}, {steps} steps, median of {repeats}:")
    print("| spinning | end to end ms |\n| --- | ---: |")
    for side, ms in median.items():
        print(f"| {side} | {ms:.1f} |")
    print(f"off is {median['on'] / median['off']:.2f}x the speed of on")


if __name__ == "__main__":
    main()
