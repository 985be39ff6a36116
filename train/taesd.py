"""Train a TAESD for the embedded tiny model (``make train-tiny-taesd``), on a CPU.

TAESD (madebyollin/taesd; diffusers' ``AutoencoderTiny``) is distilled from a model's own
VAE: its encoder learns the VAE's latents as the UNet sees them (the distribution's mean
times the scaling factor, so its own scaling factor is 1), its decoder the picture back
from those latents (sampled, as the UNet's outputs are never exactly a mean). Here the
teacher is the shipped tiny VAE, the pictures the shapes data (train/shapes.py): what
``--vae sdtrt/assets/tiny-taesd`` then runs, and what tests/test_trained.py measures of it
against the VAE (TAESD's own claim for SD, that it loses little, is not measured offline).

    python -m sdtrt.train.taesd --out sdtrt/assets/tiny-taesd [--steps N]

The defaults are the run that made the shipped weights: 12 minutes on 2 cores.
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


def distill(
    taesd: Any, vae: Any, steps: int, batch: int, lr: float, seed: int
) -> dict[str, list[float]]:
    """Train ``taesd``'s encoder on ``vae``'s scaled latent means and its decoder on the
    pictures from ``vae``'s scaled latent samples (each loss its own half's)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scaling = vae.config.scaling_factor
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
        encoder_loss = torch.nn.functional.mse_loss(taesd.encode(pixels).latents, target)
        decoder_loss = torch.nn.functional.mse_loss(taesd.decode(sampled).sample, pixels)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    vae = build_tiny_trained()["vae"]
    taesd = build_tiny_taesd(args.seed)
    start = time.perf_counter()
    losses = distill(taesd, vae, args.steps, args.batch, 2e-3, args.seed)
    record = {
        "commit": head_commit(),
        "args": vars(args),
        "teacher": "the shipped tiny VAE (sdtrt/assets/tiny/vae.safetensors)",
        "seconds": round(time.perf_counter() - start, 1),
        "encoder_loss_last_200": float(np.mean(losses["encoder"][-200:])),
        "decoder_loss_last_200": float(np.mean(losses["decoder"][-200:])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save(taesd, Path(args.out), record)
    logger.info("wrote %s: %s", args.out, record)


if __name__ == "__main__":
    main()
