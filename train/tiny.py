"""Train the embedded tiny model on the shapes data (``make train-tiny``), on a CPU.

The architecture is ``tiny-random``'s (``sdtrt.models.build_tiny``: the same diffusers and
transformers classes as SD 1.x, at tiny sizes). First the KL autoencoder (reconstruction + a
small KL term), its latent scaling factor measured as SD's was (1 / std of the latents); then
the UNet and the text encoder together on its latents with SD 2.x's v-prediction loss
(min-SNR weighted) under DDPM's linear noise schedule, captions dropped 10% of the time so
classifier-free guidance works and contradicted at low noise so that img2img keeps its
input (``_caption``). The defaults are the run that made the shipped weights: 30 minutes
on 2 cores.

    python -m sdtrt.train.tiny --out sdtrt/assets/tiny [--vae-steps N] [--unet-steps N]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.train import shapes

logger = logging.getLogger("sdtrt.train")

PREDICTION = "v_prediction"
# DDPM's linear schedule, not SD's scaled-linear: at t = 999 SD's keeps sqrt(alpha_bar) = 0.07
# of the picture (sigma 14.6), and on 8x8 latents the background colour, an average over 64
# positions, then still shows through the noise (SNR ~0.3): measured, a seed-1 model kept the
# input's background at strength 1.0. Linear leaves 0.006 (sigma 157).
NOISE_SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
POOL = 12000  # scenes the UNet trains on (8 x 7 colour pairs x 3 shapes, any size and place)
EMA_DECAY = 0.999
CONTRADICT = 0.4  # the chance of a wrong caption at t = 0, falling to 0 at t = 1000


def train_vae(vae: Any, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    vae.train()
    losses = []
    for step in range(steps):
        pixels = torch.from_numpy(shapes.batch(rng, batch)[0])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.5f", step, steps, np.mean(losses[-200:]))
    vae.eval()
    return losses


@torch.no_grad()
def latent_scale(vae: Any, seed: int, n: int = 512) -> float:
    """1 / std of the latents of ``n`` pictures: what SD's 0.18215 is for its VAE."""
    pixels = torch.from_numpy(shapes.batch(np.random.default_rng(seed), n)[0])
    # Its own generator: the factor then does not depend on what drew from torch's global
    # one before (a trained or a loaded autoencoder, --vae-from).
    generator = torch.Generator().manual_seed(seed)
    return float(1.0 / vae.encode(pixels).latent_dist.sample(generator).std())


def train_unet(
    components: dict[str, Any], steps: int, batch: int, lr: float, seed: int
) -> list[float]:
    from diffusers import DDPMScheduler

    from sdtrt.models import SD15_SCHEDULER_CONFIG

    vae, unet, text = components["vae"], components["unet"], components["text_encoder"]
    tokenizer = components["tokenizer"]
    noise_schedule = DDPMScheduler.from_config(
        {**SD15_SCHEDULER_CONFIG, **NOISE_SCHEDULE, "prediction_type": PREDICTION}
    )
    rng = np.random.default_rng(seed + 1)
    generator = torch.Generator().manual_seed(seed + 1)
    # A pool of scenes, their latent distributions encoded once (the VAE is frozen now).
    pool = np.random.default_rng(seed + 2)
    scenes = [shapes.random_scene(pool) for _ in range(POOL)]
    with torch.no_grad():
        moments = torch.cat(
            [
                vae.encode(
                    torch.from_numpy(shapes.pixels_of(scenes[i : i + 256]))
                ).latent_dist.parameters
                for i in range(0, len(scenes), 256)
            ]
        )
    captions_all = [s.caption for s in scenes]
    scaling = vae.config.scaling_factor
    parameters = [*unet.parameters(), *text.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    # An exponential moving average of the weights is what is saved, as diffusion models'
    # training usually does (not compared here against the last step's weights).
    averaged = [p.detach().clone() for p in parameters]
    snr = noise_schedule.alphas_cumprod / (1 - noise_schedule.alphas_cumprod)
    unet.train()
    text.train()
    losses = []
    for step in range(steps):
        pick = rng.integers(0, len(scenes), batch)
        t = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator
        )
        captions = [_caption(captions_all, i, int(ti), rng) for i, ti in zip(pick, t, strict=True)]
        mean, logvar = moments[torch.from_numpy(pick)].chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = text(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        # v-prediction (SD 2.x's): well conditioned at high noise, where the caption must
        # decide the colours (noise prediction left them to the last few steps: measured,
        # text-to-image drifted to the zero latent's colour). Min-SNR weighting (gamma 5,
        # Hang et al. 2023) keeps the easy low-noise steps from dominating the loss.
        target = noise_schedule.get_velocity(latents, noise, t)
        weight = snr[t].clamp(max=5.0) / (snr[t] + 1)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for avg, p in zip(averaged, parameters, strict=True):
                avg.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            logger.info("unet step %d/%d loss %.5f", step, steps, np.mean(losses[-200:]))
    with torch.no_grad():
        for avg, p in zip(averaged, parameters, strict=True):
            p.copy_(avg)
    unet.eval()
    text.eval()
    return losses


def _caption(captions: list[str], i: int, t: int, rng: np.random.Generator) -> str:
    """Scene ``i``'s caption; dropped 10% of the time (classifier-free guidance needs the
    unconditional model); replaced by another scene's with a probability that falls from
    40% at t = 0 to 0 at t = 1000. A caption that always matched taught a model to trust it
    over the picture at any noise level: measured, img2img repainted the input from a
    contradicting prompt even at strength 0.1. Trusted more as the noise grows, the
    caption decides the picture where the noise has erased it (text-to-image, high
    strength) and the picture wins where it is still there (low strength)."""
    if rng.random() < 0.10:
        return ""
    if rng.random() < CONTRADICT * (1 - t / 1000):
        return captions[int(rng.integers(0, len(captions)))]
    return captions[i]


@torch.no_grad()
def as_shipped(module: torch.nn.Module) -> None:
    """Round ``module``'s weights to fp16 and back, as ``save`` and the loader do."""
    for parameter in module.parameters():
        parameter.copy_(parameter.half().float())


def save(components: dict[str, Any], out: Path, record: dict[str, Any]) -> None:
    """The three networks' weights (safetensors, fp16 halves the size and is what the
    loader casts back to fp32) and what made them."""
    from safetensors.torch import save_file

    from sdtrt.fileio import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "unet", "vae"):
        with atomic_path(out / f"{name}.safetensors") as tmp:
            save_file(fp16_state(components[name]), str(tmp))
    write_json(out / "training.json", record)


def fp16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights in fp16, as the shipped files hold them."""
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def head_commit(here: Path = Path(__file__).parent) -> str:
    """The commit the training code runs at, for its record: read when a run starts (a run
    that outlasts a commit made meanwhile ran the earlier one), "-dirty" where the working
    tree had changes then (git describe's word: the code may not be the commit's)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode == 1
    return head.stdout.strip() + ("-dirty" if changed else "")


def main() -> None:
    from sdtrt.models import TINY_WEIGHTS, build_tiny, load_fp32_weights

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(TINY_WEIGHTS))
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vae-from", default=None, help="start from this folder's trained VAE (no VAE training)"
    )
    args = parser.parse_args()
    commit = head_commit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    components = build_tiny()
    start = time.perf_counter()
    if args.vae_from:
        load_fp32_weights(components["vae"], Path(args.vae_from) / "vae.safetensors")
        # What made that autoencoder, carried into this record.
        made = json.loads((Path(args.vae_from) / "training.json").read_text())
        vae_record = {k: made[k] for k in ("vae_seconds", "vae_loss_last_200")}
        vae_record["vae_commit"] = made.get("vae_commit", made["commit"])
    else:
        vae_losses = train_vae(components["vae"], args.vae_steps, args.vae_batch, 1e-3, args.seed)
        vae_record = {
            "vae_seconds": round(time.perf_counter() - start, 1),
            "vae_loss_last_200": float(np.mean(vae_losses[-200:])),
        }
        # The UNet trains on the autoencoder as it ships (fp16 weights, cast back): the one
        # a --vae-from run loads. Measured before this: the fp32 autoencoder's latent scale
        # differed in the 4th digit (0.56711 against 0.56721), and so did the UNet.
        as_shipped(components["vae"])
    scaling = latent_scale(components["vae"], args.seed + 7)
    components["vae"].register_to_config(scaling_factor=scaling)
    logger.info("vae: %s; latent scaling factor %.5f", vae_record, scaling)
    start = time.perf_counter()
    unet_losses = train_unet(components, args.unet_steps, args.unet_batch, 1e-3, args.seed)
    unet_seconds = time.perf_counter() - start
    record = {
        "commit": commit,
        "args": vars(args),
        "scaling_factor": scaling,
        "prediction_type": PREDICTION,
        "noise_schedule": NOISE_SCHEDULE,
        **vae_record,
        "unet_seconds": round(unet_seconds, 1),
        "unet_loss_last_200": float(np.mean(unet_losses[-200:])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save(components, Path(args.out), record)
    logger.info("wrote %s: %s", args.out, json.dumps(record))


if __name__ == "__main__":
    main()
