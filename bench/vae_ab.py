"""TAESD (diffusers' AutoencoderTiny, ``--vae TAESD_DIR``) against the model's own VAE, in
LCM-LoRA's few-step recipe, where the VAE is most of the time: end-to-end latency per
image and each stage, one model, one process.

    python -m sdtrt.bench.vae_ab [--model sd15-random] [--taesd DIR] [--size 256] [--repeats 3]

Without ``--taesd``, TAESD's architecture (AutoencoderTiny's defaults, which are
madebyollin/taesd's) with random weights from a fixed seed: the same work per image, so
the same time; what its pictures lose against the full VAE is TAESD's own claim, not
measured here. The text encoder and UNet are shared by both runs (loaded once); the runs
alternate after a warm-up run of each; the figures are medians over the repeats. Torch
backend, fp32 on the CPU unless ``--device cuda`` (and ``--dtype fp16``).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdtrt.adapters import load_vae
from sdtrt.bench.lcm_ab import RUNS, run_once
from sdtrt.bench.timing import alternate
from sdtrt.models import load_components
from sdtrt.options import SAMPLE_IMAGE, TorchOptions
from sdtrt.runtime.inputs import load_image
from sdtrt.runtime.pipeline import Img2ImgPipeline

# LCM-LoRA's img2img recipe (diffusers' docs), as bench/lcm_ab.py runs it.
RECIPE = RUNS["lcm-lora recipe"]
SCHEDULER, STEPS, STRENGTH, GUIDANCE = RECIPE


def random_taesd(folder: Path, seed: int = 0) -> Path:
    """TAESD's architecture with random weights, saved as its diffusers folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae: Any = AutoencoderTiny()
    vae.save_pretrained(folder)
    return folder


def measure(
    model: str, taesd: str | None, size: int, repeats: int, device: str, dtype: str = "fp32"
) -> dict[str, Any]:
    components = load_components(model)
    with tempfile.TemporaryDirectory() as scratch:
        folder = taesd or str(random_taesd(Path(scratch) / "taesd-random"))
        tiny_vae = load_vae(folder, components["vae"], allow_pickle=False)
    options = TorchOptions(device=device, dtype=dtype)
    pipes = {
        "model's VAE": Img2ImgPipeline.from_components(
            components, options, SCHEDULER, show_progress=False
        ),
        "TAESD": Img2ImgPipeline.from_components(
            {**components, "vae": tiny_vae}, options, SCHEDULER, show_progress=False
        ),
    }
    parameters = {
        name: sum(p.numel() for p in vae.parameters())
        for name, vae in (("model's VAE", components["vae"]), ("TAESD", tiny_vae))
    }
    image = load_image(SAMPLE_IMAGE).resize((size, size))

    runs: dict[str, Callable[[], Any]] = {
        name: functools.partial(run_once, pipe, image, RECIPE) for name, pipe in pipes.items()
    }
    medians, _ = alternate(runs, repeats)
    full, tiny = (medians[name] for name in pipes)
    vae_ms = {name: m["vae_encoder"] + m["vae_decoder"] for name, m in medians.items()}
    return {
        "model": model,
        "taesd": taesd or "taesd-random (AutoencoderTiny defaults, seed 0)",
        "size": size,
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "recipe": {
            "scheduler": SCHEDULER,
            "num_inference_steps": STEPS,
            "strength": STRENGTH,
            "guidance_scale": GUIDANCE,
        },
        "vae_parameters": parameters,
        "median_ms": medians,
        "vae_share": {name: vae_ms[name] / m["total"] for name, m in medians.items()},
        "speedup": {
            "end_to_end": full["total"] / tiny["total"],
            "vae_encoder": full["vae_encoder"] / tiny["vae_encoder"],
            "vae_decoder": full["vae_decoder"] / tiny["vae_decoder"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--taesd", default=None, help="a TAESD diffusers folder")
    parser.add_argument("--size", type=int, default=256, help="square image side, pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    args = parser.parse_args()
    report = measure(args.model, args.taesd, args.size, args.repeats, args.device, args.dtype)
    print(json.dumps(report, indent=2))
    for name, stages in report["median_ms"].items():
        line = ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        print(f"{name}: ms: {line}; VAE {report['vae_share'][name]:.0%} of the time")
    speedup = report["speedup"]
    print(
        f"TAESD: {speedup['end_to_end']:.2f}x end to end (encoder {speedup['vae_encoder']:.1f}x,"
        f" decoder {speedup['vae_decoder']:.1f}x)"
    )


if __name__ == "__main__":
    main()
