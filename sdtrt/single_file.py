"""A single checkpoint file in the original Stable Diffusion layout (what A1111, ComfyUI and
the big community sites keep), read through diffusers' single-file loader, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtrt.errors import InvalidInputError, ModelNotFoundError
from sdtrt.export.networks import check_unet_config
from sdtrt.models import check_folder_parts, quiet_loaders
from sdtrt.source import ModelSource

SAFE = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")


def load_single_file(path: Path, source: ModelSource) -> dict[str, Any]:
    """The five components from ``path``, with the architecture (configs, tokenizer,
    scheduler) from ``source.config``: a diffusers folder of the same model, or the
    original YAML config."""
    suffix = path.suffix.lower()
    if suffix not in SAFE + PICKLES:
        raise InvalidInputError(
            f"{path}: a model file must be .safetensors (or .ckpt with --allow-pickle)"
        )
    if suffix in PICKLES and not source.allow_pickle:
        raise InvalidInputError(
            f"{path} is a pickle: loading it runs code stored in the file. Convert it to "
            ".safetensors, or pass --allow-pickle if you trust where it came from"
        )
    if source.config is None:
        raise InvalidInputError(
            f"{path} is a single checkpoint: pass --config with a diffusers folder of the same "
            "architecture (model_index.json, tokenizer/, scheduler/, */config.json) or the "
            "original YAML config; nothing is downloaded"
        )
    config = Path(source.config)
    if not config.exists():
        raise ModelNotFoundError(f"--config {config} does not exist")
    if config.is_dir():
        check_folder_parts(config, "diffusers folder for --config")
    where = {"config": str(config)} if config.is_dir() else {"original_config": str(config)}
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError

    # SingleFileComponentError: the file lacks a component's weights (not a checkpoint).
    failures = (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        SafetensorError,
        SingleFileComponentError,
    )
    try:
        with quiet_loaders():
            pipe: Any = StableDiffusionPipeline.from_single_file(
                str(path),
                local_files_only=True,
                torch_dtype=torch.float32,
                safety_checker=None,
                requires_safety_checker=False,
                **where,
            )
    except failures as exc:
        raise ModelNotFoundError(
            f"could not load {path} as a Stable Diffusion checkpoint with the config "
            f"{config}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    check_unet_config(
        pipe.unet.config,
        pipe.vae.config.latent_channels,
        pipe.text_encoder.config.hidden_size,
        f"{path} (with the config {config})",
    )
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder.eval(),
        "unet": pipe.unet.eval(),
        "vae": pipe.vae.eval(),
        "scheduler": pipe.scheduler,
    }
