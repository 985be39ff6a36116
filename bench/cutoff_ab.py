"""Guidance cut off after a share of the steps (diffusers' SDCFGCutoffCallback) against
guidance at every step, on one model, in one process: end-to-end latency per image, the
UNet's rows, and how far the two images are apart.

    python -m sdtrt.bench.cutoff_ab [--model sd15-random] [--size 256] [--ratio 0.4]

After the cutoff the UNet runs on the image's row alone, not on [uncond, cond]: half the
work of each step left. What that costs in image quality is the model's to say (a random
model's guidance means nothing); the mean difference is reported so that a trained model's
run shows it. The two runs alternate after a warm-up run of each; the figures are medians
over the repeats. Torch backend, fp32, on the CPU unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import numpy as np
import torch
from diffusers.callbacks import SDCFGCutoffCallback

from sdtrt.bench.lcm_ab import RUNS, run_once, setting
from sdtrt.bench.timing import alternate
from sdtrt.options import SAMPLE_IMAGE, TorchOptions
from sdtrt.runtime.inputs import load_image
from sdtrt.runtime.pipeline import Img2ImgPipeline


def measure(model: str, size: int, steps: int, ratio: float, repeats: int, device: str) -> Any:
    pipe = Img2ImgPipeline.from_pretrained(model, TorchOptions(device=device), show_progress=False)
    rows: list[int] = []
    unet = pipe.backend.unet

    def counted(
        sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        rows.append(len(sample))
        return unet(sample, timestep, encoder_hidden_states)

    pipe.backend.unet = counted  # type: ignore[method-assign]  # rows counted per call
    image = load_image(SAMPLE_IMAGE).resize((size, size))
    scheduler, _, strength, guidance = RUNS["default"]  # lms at strength 0.8, guidance 7.5
    run = (scheduler, steps, strength, guidance)
    callbacks = {"guided": None, f"cutoff {ratio}": SDCFGCutoffCallback(cutoff_step_ratio=ratio)}
    rows_of: dict[str, list[int]] = {}

    def call(name: str) -> Any:
        rows.clear()
        out = run_once(pipe, image, run, callback_on_step_end=callbacks[name])
        rows_of[name] = list(rows)
        return out

    medians, last = alternate({name: functools.partial(call, name) for name in callbacks}, repeats)
    guided, cut = (medians[name]["total"] for name in callbacks)
    images = [np.round(last[name].images * 255) for name in callbacks]
    return {
        **setting(model, size, device, repeats),
        "run": dict(zip(("scheduler", "steps", "strength", "guidance"), run, strict=True)),
        "runs": {
            name: {
                "unet_calls": last[name].unet_calls,
                "unet_rows": sum(rows_of[name]),
                "median_ms": medians[name],
            }
            for name in callbacks
        },
        "speedup": guided / cut,
        "mean_levels_apart": float(np.abs(images[0] - images[1]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=256, help="square image side, pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.4, help="share of the steps guided")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    report = measure(args.model, args.size, args.steps, args.ratio, args.repeats, args.device)
    print(json.dumps(report, indent=2))
    for name, run in report["runs"].items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in run["median_ms"].items())
        print(f"{name}: {run['unet_calls']} UNet calls, {run['unet_rows']} rows; ms: {stages}")
    print(
        f"the cutoff is {report['speedup']:.2f}x faster end to end; the images are "
        f"{report['mean_levels_apart']:.1f} levels apart on average (0-255)"
    )


if __name__ == "__main__":
    main()
