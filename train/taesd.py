"""Train a TAESD for the embedded tiny model (``make train-tiny-taesd``), on a CPU.

TAESD (madebyollin/taesd; diffusers' ``AutoencoderTiny``) is distilled from a model's own
VAE: its encoder learns the VAE's latents as the UNet sees them (the distribution's mean
times the scaling factor, so its own scaling factor is 1), its decoder what the VAE decodes
from latents. Here the teacher is the shipped tiny VAE, the pictures the shapes data
(train/shapes.py): what ``--vae sdtrt/assets/tiny-taesd`` then runs, and what
tests/test_trained.py measures of it against the VAE (TAESD's own claim for SD, that it
loses little, is not measured offline).

The decoder sees two kinds of latents in every batch: the VAE's samples of pictures, with
the pictures as targets, and the latents the tiny UNet itself ends img2img runs with (a
pool made once, before training, by the pipeline), with the VAE's decoding of them as
targets. The UNet's latents reach past the pictures' (|latent| up to ~5 against ~3): a
decoder trained on pictures' latents alone drew a black blotch there (measured on the
demo's run: bench/README.md, "A TAESD for the tiny model").

    python -m sdtrt.train.taesd --out sdtrt/assets/tiny-taesd [--steps N]

The defaults are the run that made the shipped weights: about 20 minutes on 2 cores (2 of
them making the pool).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.train import shapes
from sdtrt.train.tiny import fp16_state, head_commit

logger = logging.getLogger("sdtrt.train")

# TAESD's layout (encoder and decoder blocks of its own) at the tiny VAE's scale: 4-channel
# latents at 1/8 of the picture.
TINY_TAESD = dict(
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(16, 16, 16, 16),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)


def build_tiny_taesd(seed: int = 0) -> Any:
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(**TINY_TAESD)


@torch.no_grad()
def unet_latents(components: dict[str, Any], n: int, seed: int) -> torch.Tensor:
    """``n`` latents the model's UNet ends img2img runs with, as its pipeline gives them
    (``output_type="latent"``): random pictures of the shapes data under other pictures'
    captions, strength in [0.2, 1.0], guidance in [1, 8], 20 steps of LMS."""
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    pipe = Img2ImgPipeline.from_components(components, "torch", show_progress=False)
    rng = np.random.default_rng(seed)
    per_call = pipe.limits.max_batch
    latents = []
    for call in range((n + per_call - 1) // per_call):
        pictures = [shapes.random_scene(rng).draw() for _ in range(per_call)]
        prompts = [shapes.random_scene(rng).caption for _ in range(per_call)]
        out = pipe(
            prompts,
            pictures,
            strength=float(rng.uniform(0.2, 1.0)),
            num_inference_steps=20,
            guidance_scale=float(rng.uniform(1.0, 8.0)),
            generator=torch.Generator().manual_seed(seed * 100003 + call),
            output_type="latent",
        )
        latents.append(out.images)
    return torch.cat(latents)[:n]


def distill(
    taesd: Any,
    vae: Any,
    pool: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, list[float]]:
    """Train ``taesd``'s encoder on ``vae``'s scaled latent means, and its decoder on the
    pictures from ``vae``'s scaled latent samples and on ``vae``'s decoding of the scaled
    latents in ``pool`` (each loss its own half's)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scaling = vae.config.scaling_factor
    with torch.no_grad():  # clamped, as the image processor clamps what a user sees
        decoded = torch.cat([vae.decode(part / scaling).sample for part in pool.split(64)])
        decoded = decoded.clamp(-1.0, 1.0)
    optimiser = torch.optim.AdamW(taesd.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    taesd.train()
    losses: dict[str, list[float]] = {"encoder": [], "decoder": []}
    for step in range(steps):
        pixels = torch.from_numpy(shapes.batch(rng, batch)[0])
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            target = scaling * posterior.mean
            sampled = scaling * posterior.sample(generator)
        chosen = torch.from_numpy(rng.choice(len(pool), batch, replace=False))
        encoder_loss = torch.nn.functional.mse_loss(taesd.encode(pixels).latents, target)
        decoder_loss = torch.nn.functional.mse_loss(
            taesd.decode(torch.cat([sampled, pool[chosen]])).sample,
            torch.cat([pixels, decoded[chosen]]),
        )
        optimiser.zero_grad(set_to_none=True)
        (encoder_loss + decoder_loss).backward()
        optimiser.step()
        schedule.step()
        losses["encoder"].append(encoder_loss.item())
        losses["decoder"].append(decoder_loss.item())
        if step % 200 == 0 or step == steps - 1:
            logger.info(
                "taesd step %d/%d encoder %.5f decoder %.5f",
                step,
                steps,
                np.mean(losses["encoder"][-200:]),
                np.mean(losses["decoder"][-200:]),
            )
    taesd.eval()
    return losses


def save(taesd: Any, out: Path, record: dict[str, Any]) -> None:
    """Its diffusers folder (``config.json``, fp16 safetensors: what ``--vae`` reads, cast
    back to the model's dtype) and what made it; written whole or not at all."""
    from safetensors.torch import save_file

    from sdtrt.fileio import atomic_dir, write_json

    state = fp16_state(taesd)
    with atomic_dir(out, lambda path: (Path(path) / "training.json").is_file()) as tmp:
        taesd.save_config(tmp)
        save_file(state, str(tmp / "diffusion_pytorch_model.safetensors"))
        write_json(tmp / "training.json", record)


def main() -> None:
    from sdtrt.models import TINY_TAESD_WEIGHTS, build_tiny_trained

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(TINY_TAESD_WEIGHTS))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool", type=int, default=4096, help="UNet latents the decoder learns the VAE's on"
    )
    args = parser.parse_args()
    commit = head_commit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    components = build_tiny_trained()
    start = time.perf_counter()
    # Seeds of their own: not the tests' (0-3), nor the pictures' draws in training.
    pool = unet_latents(components, args.pool, seed=1000 + args.seed)
    pool_seconds = time.perf_counter() - start
    logger.info("%d UNet latents in %.0f s", len(pool), pool_seconds)
    taesd = build_tiny_taesd(args.seed)
    losses = distill(taesd, components["vae"], pool, args.steps, args.batch, 2e-3, args.seed)
    record = {
        "commit": commit,
        "args": vars(args),
        "teacher": "the shipped tiny VAE (sdtrt/assets/tiny/vae.safetensors)",
        "seconds": round(time.perf_counter() - start, 1),
        "pool_seconds": round(pool_seconds, 1),
        "pool_max_abs": round(float(pool.abs().max()), 2),
        "encoder_loss_last_200": float(np.mean(losses["encoder"][-200:])),
        "decoder_loss_last_200": float(np.mean(losses["decoder"][-200:])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save(taesd, Path(args.out), record)
    logger.info("wrote %s: %s", args.out, record)


if __name__ == "__main__":
    main()
