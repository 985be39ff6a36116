"""LCM-LoRA's recipe (scheduler lcm, a few steps, guidance 1) against sdtrt's default run
(lms, 50 steps at strength 0.8, guidance 7.5) on one model, in one process: end-to-end
latency per image, UNet calls, and each stage's share.

    python -m sdtrt.bench.lcm_ab [--model sd15-random] [--size 256] [--repeats 3]

The LoRA itself changes weights only (fused as the model loads: no cost per image), so a
model without it times the recipe exactly; what it buys in image quality is LCM-LoRA's
claim, not measured here. The two runs alternate after a warm-up run of each; the figures
are medians over the repeats. Torch backend, fp32, on the CPU unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import torch

from sdtrt.bench.timing import alternate
from sdtrt.options import SAMPLE_IMAGE, TorchOptions
from sdtrt.runtime.inputs import load_image
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.schedulers import make_scheduler

# (scheduler, steps, strength, guidance): sdtrt's defaults (guidance 7.5, SD's usual), and
# diffusers' LCM-LoRA example for img2img.
RUNS = {
    "default": ("lms", 50, 0.8, 7.5),
    "lcm-lora recipe": ("lcm", 4, 0.5, 1.0),
}
PROMPT = "A colorful dancer, nat geo photo"


def run_once(
    pipe: Img2ImgPipeline, image: Any, run: tuple[str, int, float, float], **more: Any
) -> Any:
    """One img2img call of ``run`` (a RUNS entry; its scheduler is the pipeline's own), the
    prompt and seed fixed, ``more`` of the call's keywords: what each bench here times."""
    _, steps, strength, guidance = run
    return pipe(
        PROMPT,
        image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(32),
        output_type="np",
        **more,
    )


def setting(model: str, size: int, device: str, repeats: int) -> dict[str, Any]:
    """What each A/B here reports of where it ran: the model, square image side, device,
    repeats and PyTorch's intra-op threads."""
    return {
        "model": model,
        "size": size,
        "device": device,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def measure(model: str, size: int, repeats: int, device: str) -> dict[str, Any]:
    # One model load (SD 1.5 in fp32 is 4 GB); each run swaps in its scheduler.
    pipe = Img2ImgPipeline.from_pretrained(model, TorchOptions(device=device), show_progress=False)
    schedulers = {
        name: make_scheduler(scheduler, pipe.model_scheduler_config)
        for name, (scheduler, *_) in RUNS.items()
    }
    image = load_image(SAMPLE_IMAGE).resize((size, size))

    def call(name: str) -> Any:
        pipe.scheduler = schedulers[name]
        return run_once(pipe, image, RUNS[name])

    medians, last = alternate({name: functools.partial(call, name) for name in RUNS}, repeats)
    default, recipe = (medians[name]["total"] for name in RUNS)
    return {
        **setting(model, size, device, repeats),
        "runs": {
            name: {
                "scheduler": scheduler,
                "steps": steps,
                "strength": strength,
                "guidance": guidance,
                "unet_calls": last[name].unet_calls,
                "rows_per_call": 2 if guidance > 1 else 1,
                "median_ms": medians[name],
            }
            for name, (scheduler, steps, strength, guidance) in RUNS.items()
        },
        "speedup": default / recipe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=256, help="square image side, pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    report = measure(args.model, args.size, args.repeats, args.device)
    print(json.dumps(report, indent=2))
    for name, run in report["runs"].items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in run["median_ms"].items())
        calls = f"{run['unet_calls']} UNet calls of {run['rows_per_call']} rows"
        print(f"{name}: {calls}; ms: {stages}")
    print(f"the recipe is {report['speedup']:.1f}x faster end to end")


if __name__ == "__main__":
    main()
