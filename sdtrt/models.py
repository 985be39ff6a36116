"""Model loading: the embedded tiny default, SD 1.5 / SD 2.1 shapes with random weights,
or a local diffusers folder. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdtrt.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

FOLDER_PARTS = ("model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler")

# The scheduler config real SD 1.5 ships (a PNDM config, normalised on load by diffusers).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_SCHEDULER_CONFIG: dict[str, Any] = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}

_SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)
_SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)


def _build(
    *,
    text: dict[str, Any],
    unet: dict[str, Any],
    vae: dict[str, Any],
    scheduler: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """Build the components with random weights drawn from a fixed seed."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrt.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
        **text,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config).eval()
    torch.manual_seed(seed + 1)
    unet_model: Any = UNet2DConditionModel(**unet)  # diffusers' models are untyped modules
    unet_model.eval()
    torch.manual_seed(seed + 2)
    vae_model: Any = AutoencoderKL(**vae)
    vae_model.eval()
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet_model,
        "vae": vae_model,
        "scheduler": PNDMScheduler.from_config(scheduler),
    }


def build_tiny() -> dict[str, Any]:
    """SD 1.x architecture at tiny sizes, as diffusers' fast tests build it, but with a VAE
    of four blocks so that latents are H/8 x W/8 as in the real model. The UNet has one
    downsampler, so sizes must be multiples of 16 px."""
    return _build(
        text=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=1000,
            layer_norm_eps=1e-5,
        ),
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        ),
        vae=dict(
            block_out_channels=(8, 16, 16, 16),
            norm_num_groups=8,
            layers_per_block=1,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=64,
        ),
        scheduler=SD15_SCHEDULER_CONFIG,
    )


def build_sd15_random() -> dict[str, Any]:
    """SD 1.5's real UNet, VAE and CLIP ViT-L/14 text-encoder configs, random weights."""
    return _build(
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        unet=dict(**_SD_UNET, cross_attention_dim=768, attention_head_dim=8),
        vae=_SD_VAE,
        scheduler=SD15_SCHEDULER_CONFIG,
    )


def build_sd21_random() -> dict[str, Any]:
    """SD 2.1's real configs (OpenCLIP ViT-H text encoder, linear projections,
    v-prediction), random weights."""
    return _build(
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            vocab_size=49408,
            hidden_act="gelu",
            projection_dim=512,
        ),
        unet=dict(
            **{**_SD_UNET, "sample_size": 96},
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        ),
        vae=_SD_VAE,
        scheduler=SD21_SCHEDULER_CONFIG,
    )


BUILTIN_MODELS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": build_tiny,
    "sd15-random": build_sd15_random,
    "sd21-random": build_sd21_random,
}


def load_components(model: str) -> dict[str, Any]:
    """Return ``{tokenizer, text_encoder, unet, vae, scheduler}`` for a built-in model name
    or a local diffusers-format folder."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]()
    path = Path(model)
    if not path.exists():
        raise ModelNotFoundError(
            f"unknown model {model!r}: expected one of {', '.join(BUILTIN_MODELS)} "
            "or a local diffusers folder"
        )
    return load_diffusers_folder(path)


def source_name(model: str) -> str:
    """How a model is recorded in an export's manifest: built-in names as they are, folders
    as absolute paths, so that ``check`` and ``bench`` find the source again."""
    return model if model in BUILTIN_MODELS else str(Path(model).resolve())


def load_diffusers_folder(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is not a folder")
    if (path / "vae_decoder").is_dir() or (path / "unet" / "model.onnx").is_file():
        raise ModelNotFoundError(
            f"{path} holds ONNX graphs but no sdtrt.json manifest: not a folder written by "
            "`sdtrt export`; export the model again"
        )
    missing = [p for p in FOLDER_PARTS if not (path / p).exists()]
    if missing:
        raise ModelNotFoundError(
            f"{path} is not a complete diffusers folder: missing {', '.join(missing)} "
            f"(expected {', '.join(FOLDER_PARTS)})"
        )
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
    try:
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
            "text_encoder": CLIPTextModel.from_pretrained(
                path / "text_encoder", local_files_only=True
            ).eval(),
            "unet": UNet2DConditionModel.from_pretrained(
                path, subfolder="unet", local_files_only=True
            ).eval(),
            "vae": AutoencoderKL.from_pretrained(
                path, subfolder="vae", local_files_only=True
            ).eval(),
            "scheduler": scheduler_cls.from_config(scheduler_config),
        }
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load the diffusers folder {path}: {exc}") from exc


def model_fingerprint(components: dict[str, Any]) -> str:
    """sha256 over every network's config and weights, the scheduler config and the
    vocabulary: the key of anything exported or built from these components."""
    digest = hashlib.sha256()
    for name in ("text_encoder", "unet", "vae"):
        module = components[name]
        digest.update(name.encode())
        digest.update(_config_json(module.config))
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{key}:{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    scheduler_config = components["scheduler"].config
    digest.update(_config_json(scheduler_config))
    # Which values were defaults changes what another scheduler class built from this
    # config gets (diffusers' from_config drops them), so it is part of the key.
    digest.update(repr(sorted(scheduler_config.get("_use_default_values", []))).encode())
    digest.update(json.dumps(components["tokenizer"].get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


# Written by save_pretrained, not part of what the network computes (the weights' dtype is
# hashed with the weights).
_BOOKKEEPING = {"transformers_version", "architectures", "dtype", "torch_dtype"}


def _config_json(config: Any) -> bytes:
    """A config's meaning as bytes: bookkeeping keys (``_name_or_path``, versions, which
    values were defaults) are left out, so a saved and reloaded model hashes the same."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in items.items() if not k.startswith("_") and k not in _BOOKKEEPING}
    return json.dumps(kept, sort_keys=True, default=str).encode()
