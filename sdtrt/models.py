"""Model loading: the embedded tiny default (trained by the project), SD 1.5 / SD 2.1 shapes
with random weights, or a local diffusers folder. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdtrt.adapters import fuse_loras, load_embeddings, load_vae
from sdtrt.errors import InvalidInputError, ModelNotFoundError
from sdtrt.export.networks import check_unet_config
from sdtrt.source import ModelSource, as_source, is_hub_id

logger = logging.getLogger(__name__)

FOLDER_PARTS = (
    "model_index.json",
    "tokenizer",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)
# A CLIP tokenizer in either of its formats (transformers' loader makes up an unusable
# one from an empty folder rather than failing).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

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


TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny"
TINY_TAESD_WEIGHTS = Path(__file__).parent / "assets" / "tiny-taesd"
"""A TAESD distilled from the tiny model's VAE (``make train-tiny-taesd``): its diffusers
folder, what ``--vae`` reads."""


def load_fp32_weights(module: torch.nn.Module, path: Path) -> None:
    """A safetensors file's weights (fp16 as ``make train-tiny`` saves them) into ``module``
    as fp32, every key matched."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)


def build_tiny_trained() -> dict[str, Any]:
    """The embedded default: ``build_tiny``'s architecture with the weights ``make
    train-tiny`` trained on the shapes data (train/shapes.py), shipped in sdtrt/assets/tiny
    (fp16 safetensors, cast to fp32 here) with training.json: what made them."""
    components = build_tiny()
    for name in ("text_encoder", "unet", "vae"):
        path = TINY_WEIGHTS / f"{name}.safetensors"
        if not path.is_file():
            raise ModelNotFoundError(
                f"the trained tiny model's weights {path} are missing: `make train-tiny` makes them"
            )
        load_fp32_weights(components[name], path)
    training = json.loads((TINY_WEIGHTS / "training.json").read_text())
    components["vae"].register_to_config(scaling_factor=training["scaling_factor"])
    # A fresh config, not register_to_config: that leaves the key among the config's
    # `_use_default_values`, and every other scheduler class built from it (LMS, Euler...)
    # then takes its own default, epsilon, and runs a v-prediction model wrongly.
    prediction = training.get("prediction_type", "epsilon")
    schedule = training.get("noise_schedule", {})  # the betas it was trained with
    config = {**SD15_SCHEDULER_CONFIG, **schedule, "prediction_type": prediction}
    components["scheduler"] = type(components["scheduler"]).from_config(config)
    return components


def build_tiny() -> dict[str, Any]:
    """SD 1.x architecture at tiny sizes, as diffusers' fast tests build it, but with a VAE
    of four blocks so that latents are H/8 x W/8 as in the real model. The UNet has one
    downsampler, so sizes must be multiples of 16 px. Random weights from a fixed seed
    (``tiny-random``; ``tiny`` is this architecture trained)."""
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
            # 16-32 channels: at 8-16 the trained autoencoder's round trips lost the colours
            # (MSE 0.08 after 1500 steps; 16-32 reached that in 400)
            block_out_channels=(16, 32, 32, 32),
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
    "tiny": build_tiny_trained,
    "tiny-random": build_tiny,
    "sd15-random": build_sd15_random,
    "sd21-random": build_sd21_random,
}


def load_components(model: str | ModelSource) -> dict[str, Any]:
    """Return ``{tokenizer, text_encoder, unet, vae, scheduler}`` for a built-in model name,
    a local diffusers folder (default weights or a variant) or a single checkpoint file;
    with the source's VAE in place of the model's, its LoRAs fused and its embeddings
    added, then with its clip skip, the text encoder cut to the layers it keeps."""
    source = as_source(model)
    components = _load(source)
    if source.vae:
        components["vae"] = load_vae(source.vae, components["vae"], source.allow_pickle)
    if source.loras:
        fuse_loras(components, source.loras, source.allow_pickle)
    if source.embeddings:
        load_embeddings(components, source.embeddings, source.allow_pickle)
    if source.clip_skip:
        skip_clip_layers(components["text_encoder"], source.clip_skip)
    return components


def skip_clip_layers(text_encoder: Any, clip_skip: int) -> None:
    """Drop the last ``clip_skip`` layers of a CLIP text encoder, in place. Its output is
    then diffusers' ``clip_skip``: ``hidden_states[-(clip_skip + 1)]`` through the final
    layer norm. Cutting (rather than asking for every hidden state) keeps the network's
    contract, one ``last_hidden_state``, so the graphs and engines of every backend carry
    it, and the cut layers are neither run nor exported."""
    # transformers 5.6 moved CLIPTextModel's parts up from `text_model` (which
    # CLIPTextModelWithProjection still has).
    encoder = getattr(text_encoder, "text_model", text_encoder).encoder
    layers = len(encoder.layers)
    if clip_skip >= layers:
        raise InvalidInputError(
            f"clip skip {clip_skip} leaves no layer of the text encoder's {layers}: "
            f"give 1 to {layers - 1} (1: the penultimate layer's output)"
        )
    encoder.layers = encoder.layers[: layers - clip_skip]
    text_encoder.config.num_hidden_layers = layers - clip_skip


def _load(source: ModelSource) -> dict[str, Any]:
    if source.model in BUILTIN_MODELS:
        if source.variant or source.config:
            raise InvalidInputError(
                f"--variant and --config are for model folders and files, not {source.model!r}"
            )
        return BUILTIN_MODELS[source.model]()
    path = Path(source.model)
    if path.is_file():
        from sdtrt.single_file import load_single_file

        return load_single_file(path, source)
    if not path.exists():
        hub = ""
        if is_hub_id(source.model):  # not in the Hugging Face cache (ModelSource looked)
            hub = (
                f". sdtrt downloads nothing and {source.model} is not in the Hugging Face "
                f"cache: fetch it first (hf download {source.model}), then pass "
                f"{source.model} again"
            )
        raise ModelNotFoundError(
            f"unknown model {source.model!r}: expected one of {', '.join(BUILTIN_MODELS)}, "
            f"a local diffusers folder or a checkpoint file{hub}"
        )
    if source.config:
        raise InvalidInputError("--config is for a single checkpoint file, not a folder")
    return load_diffusers_folder(path, source.variant)


def source_record(model: str | ModelSource) -> ModelSource:
    """How a model is recorded in an export's manifest: built-in names as they are, folders
    and files as absolute paths, so that ``check`` and ``bench`` find the source again."""
    source = as_source(model)
    loras = tuple((str(Path(path).resolve()), scale) for path, scale in source.loras)
    embeddings = tuple((str(Path(path).resolve()), token) for path, token in source.embeddings)
    vae = str(Path(source.vae).resolve()) if source.vae else None
    source = replace(source, vae=vae, loras=loras, embeddings=embeddings)
    if source.model in BUILTIN_MODELS:
        return source
    config = str(Path(source.config).resolve()) if source.config else None
    return replace(source, model=str(Path(source.model).resolve()), config=config)


# Weight files as diffusers and transformers name them: NAME[.VARIANT].EXT, sharded
# NAME[.VARIANT]-00001-of-00002.EXT, or their index NAME.EXT.index[.VARIANT].json.
_WEIGHTS = re.compile(
    r"^(?:model|pytorch_model|diffusion_pytorch_model)"
    r"(?:\.(?P<v1>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.(?P<kind>safetensors|bin)"
    r"(?:\.index(?:\.(?P<v2>[A-Za-z0-9_]+))?\.json)?$"
)
_WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")


def _weight_files(folder: Path) -> Iterator[tuple[str | None, str]]:
    """(variant, "safetensors" or "bin") of each weight file in ``folder`` (variant None:
    the default files)."""
    for file in folder.iterdir() if folder.is_dir() else ():
        match = _WEIGHTS.match(file.name)
        if match:
            yield match["v1"] or match["v2"], match["kind"]


def folder_variants(path: Path) -> dict[str, set[str | None]]:
    """Per component, the weight variants its folder holds (None: the default files)."""
    return {c: {variant for variant, _ in _weight_files(path / c)} for c in _WEIGHT_COMPONENTS}


def choose_variant(path: Path, variant: str | None) -> str | None:
    """The variant to load: the one asked for; else the default weights; else the one
    variant there is (fp16 first when there are several)."""
    found = folder_variants(path)
    empty = [c for c, v in found.items() if not v]
    if empty:
        raise ModelNotFoundError(f"{path}: no weights in {', '.join(empty)}")
    common = set.intersection(*found.values())
    named = sorted(str(v) for v in set.union(*found.values()) if v is not None)
    if variant is not None:
        if variant not in common:
            lacking = [c for c, v in found.items() if variant not in v]
            raise ModelNotFoundError(
                f"{path}: no {variant!r} weights in {', '.join(lacking)}; variants there: "
                f"{', '.join(named) or 'none (default weights only)'}"
            )
        return variant
    if None in common:
        return None
    choices = sorted(str(v) for v in common if v is not None)
    if "fp16" in choices:
        return "fp16"
    if len(choices) == 1:
        return choices[0]
    raise ModelNotFoundError(
        f"{path} has no default weights and several variants ({', '.join(named)}): "
        "name one with --variant"
    )


@contextmanager
def quiet_loaders() -> Iterator[None]:
    """The loaders' console noise, none of it about the user's model: progress bars over
    components and weights, transformers' notes that torchvision (not a dependency) is
    missing for image processors sdtrt never uses, and diffusers' warning on casting to
    float32 with an empty list of modules to keep in float32. Errors still show."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def has_tokenizer(folder: Path) -> bool:
    """``folder`` holds a CLIP tokenizer's files, in one format or the other."""
    return any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES)


def check_folder_parts(path: Path, what: str = "diffusers folder") -> None:
    """Every config and tokenizer file the loaders read is there (the loaders make up
    defaults for some that are not: a text encoder of another size, an unusable tokenizer)."""
    missing = [p for p in FOLDER_PARTS if not (path / p).exists()]
    if (path / "tokenizer").is_dir() and not has_tokenizer(path / "tokenizer"):
        missing.append("tokenizer/tokenizer.json (or vocab.json and merges.txt)")
    if missing:
        raise ModelNotFoundError(
            f"{path} is not a complete {what}: missing {', '.join(missing)} "
            f"(expected {', '.join(FOLDER_PARTS)})"
        )


def check_folder_architecture(path: Path) -> None:
    """Refuse a folder whose UNet needs inputs img2img does not make (inpainting, SDXL...),
    from its config files, before any weights are read. An unreadable model_index.json is
    refused here (no loader reads it); another config that cannot be read is left to its
    loader, which names it."""
    index_file = path / "model_index.json"
    try:  # not read by the loaders, but diffusers refuses a folder without it: so do we
        kind = json.loads(index_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelNotFoundError(
            f"{index_file} is not a readable JSON object ({exc}): a partial copy? fetch the "
            "folder again"
        ) from exc
    names = ("unet/config", "vae/config", "text_encoder/config")
    try:
        unet, vae, text = (json.loads((path / f"{n}.json").read_text()) for n in names)
        latent_channels, text_width = vae.get("latent_channels", 4), text["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    where = f"{path} ({kind})" if kind else str(path)
    if isinstance(unet, dict):
        check_unet_config(unet, latent_channels, text_width, where)


def _graphs_not_weights(path: Path) -> ModelNotFoundError:
    """What to say of a folder of ONNX graphs given where PyTorch weights are needed."""
    from sdtrt.export.folder import is_onnx_folder

    if not is_onnx_folder(path):
        return ModelNotFoundError(
            f"{path} holds ONNX graphs but neither an sdtrt.json manifest (`sdtrt export`) "
            "nor a model_index.json (the Hugging Face ONNX layout optimum writes): export "
            "the model again"
        )
    try:
        source = json.loads((path / "sdtrt.json").read_text())["source"]["model"]
        came_from = f" ({source}, as its sdtrt.json says)"
    except (OSError, ValueError, KeyError, TypeError):
        came_from = ""
    return ModelNotFoundError(
        f"{path} is an ONNX export, not PyTorch weights: it runs as it is with --backend "
        "onnxruntime, tensorrt or tensorrt-rtx; to export it or run it on torch, name the "
        f"model it came from{came_from}"
    )


def _scheduler_config(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The scheduler class a folder's config names, and the config."""
    import diffusers
    from diffusers import SchedulerMixin

    file = folder / "scheduler_config.json"
    try:
        config = json.loads(file.read_text())
        name = config.get("_class_name", "PNDMScheduler")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelNotFoundError(f"{file} is not a readable JSON config: {exc}") from exc
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelNotFoundError(
            f"{file} names the scheduler class {name!r}, which diffusers "
            f"{diffusers.__version__} does not have (sdtrt builds the --scheduler it is asked "
            "for from this config, but reads it through the class it names)"
        )
    return cls, config


def _safetensors(folder: Path, variant: str | None) -> bool | None:
    """False where a component's weights of ``variant`` are only ``.bin`` files (older
    repositories): diffusers then reads them (``torch.load`` with ``weights_only``) without
    first logging "An error occurred while trying to fetch" the ``.safetensors`` it looked
    for; None (diffusers' default: safetensors first) otherwise."""
    kinds = {kind for found, kind in _weight_files(folder) if found == variant}
    return False if kinds == {"bin"} else None


def load_diffusers_folder(path: Path, variant: str | None = None) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is not a folder")
    if (path / "vae_decoder").is_dir() or (path / "unet" / "model.onnx").is_file():
        raise _graphs_not_weights(path)
    check_folder_parts(path)
    check_folder_architecture(path)
    variant = choose_variant(path, variant)
    if variant is not None:
        logger.info("loading the %s weights of %s", variant, path)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_cls, scheduler_config = _scheduler_config(path / "scheduler")
    # fp32 whatever the files hold: the torch backend is the fp32 reference, and it casts
    # to fp16 itself when asked (--dtype fp16).
    weights: dict[str, Any] = {"local_files_only": True, "variant": variant}
    loaders: dict[str, Callable[[], Any]] = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(
            path / "tokenizer", local_files_only=True
        ),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            path / "text_encoder", dtype=torch.float32, **weights
        ).eval(),
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            path,
            subfolder="unet",
            torch_dtype=torch.float32,
            use_safetensors=_safetensors(path / "unet", variant),
            **weights,
        ).eval(),
        "vae": lambda: AutoencoderKL.from_pretrained(
            path,
            subfolder="vae",
            torch_dtype=torch.float32,
            use_safetensors=_safetensors(path / "vae", variant),
            **weights,
        ).eval(),
        "scheduler": lambda: scheduler_cls.from_config(scheduler_config),
    }
    components = {}
    for name, load in loaders.items():
        try:
            with quiet_loaders():
                components[name] = load()
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ModelNotFoundError(
                f"could not load {name}/ of the diffusers folder {path}: {exc}"
            ) from exc
    return components


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
            # The array itself, not .tobytes(): hashlib reads its buffer without a copy
            # (SD 1.5's 4.3 GB of weights hash in 2.6 s instead of 3.8; the same digest).
            digest.update(tensor.detach().contiguous().cpu().numpy())
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
