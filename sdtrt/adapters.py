"""What community checkpoints come with besides their weights, applied as the model loads
by diffusers' own loaders: another VAE in place of the model's, LoRA weights fused (its
own, kohya's or PEFT's layout), as ``load_lora_weights`` then ``fuse_lora`` do, and textual
inversion embeddings added to the tokenizer and text encoder, as ``load_textual_inversion``
does. What is left is a plain model (other weights, a longer vocabulary), which every
backend runs and exports as it is."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sdtrt.errors import BackendUnavailableError, InvalidInputError, ModelNotFoundError

logger = logging.getLogger(__name__)


def load_vae(path: str, model_vae: Any, allow_pickle: bool) -> Any:
    """The VAE at ``path`` in place of ``model_vae``: a single file in the original layout
    (A1111's "SD VAE", ``vae-ft-mse-840000-ema-pruned.safetensors``; a whole checkpoint's
    VAE too), read with the model's own VAE config, or a diffusers VAE folder (its
    ``config.json`` and weights; a diffusers model's folder: its ``vae/``), AutoencoderKL
    or TAESD's AutoencoderTiny (``madebyollin/taesd``; or a folder of TAESD's own
    ``taesd_encoder`` and ``taesd_decoder`` files), in the model VAE's dtype."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from safetensors import SafetensorError

    from sdtrt.export.networks import is_tiny_vae
    from sdtrt.models import quiet_loaders

    where = Path(path)
    if not where.exists():
        raise ModelNotFoundError(f"VAE {path} does not exist")
    if where.is_file() and where.suffix != ".safetensors":
        _check_pickle(where, allow_pickle, "VAE")
    halves = _taesd_halves(where, allow_pickle)
    failures = (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        TypeError,
        SafetensorError,
        SingleFileComponentError,  # a file without a VAE's weights
    )
    dtype = next(model_vae.parameters()).dtype
    try:
        with quiet_loaders():
            if halves:  # TAESD's own files
                vae = _taesd_from_halves(halves)
                if dtype != torch.float32:
                    vae = vae.to(dtype)
            elif where.is_dir():  # a VAE's folder, or a diffusers model's (its vae/)
                inside = "vae" if (where / "vae" / "config.json").is_file() else None
                settings = AutoencoderKL.load_config(where, subfolder=inside)
                kind: Any = AutoencoderTiny if is_tiny_vae(settings) else AutoencoderKL
                vae = kind.from_pretrained(
                    where, subfolder=inside, torch_dtype=dtype, local_files_only=True
                )
            else:
                with tempfile.TemporaryDirectory() as config:
                    model_vae.save_config(config)
                    vae = AutoencoderKL.from_single_file(
                        str(where), config=config, torch_dtype=dtype, local_files_only=True
                    )
    except failures as exc:
        raise InvalidInputError(f"could not load the VAE {path}: {_gist(exc)}") from None
    # What the UNet and the size rule see: latent channels, and the 2^(blocks - 1) scale
    # (TAESD's encoder and decoder have block lists of their own: both must fit).
    ours, theirs = model_vae.config, vae.config
    depth = len(ours.block_out_channels)
    encoder_blocks = theirs.get("encoder_block_out_channels", theirs.block_out_channels)
    depths = {len(theirs.block_out_channels), len(encoder_blocks)}
    if theirs.latent_channels != ours.latent_channels or depths != {depth}:
        scales = " and 1/".join(str(2 ** (n - 1)) for n in sorted(depths))
        raise InvalidInputError(
            f"VAE {path} makes latents of {theirs.latent_channels} channels at 1/{scales} of "
            f"the image's size; this model's UNet takes {ours.latent_channels} channels at "
            f"1/{2 ** (depth - 1)}: a VAE made for another model"
        )
    return vae.eval()


def load_preview_vae(path: str, latent_channels: int, scale: int) -> Any:
    """A TAESD (AutoencoderTiny: its diffusers folder, or TAESD's own ``taesd_decoder``
    .safetensors, with or without ``taesd_encoder``) to decode previews with, in fp32 on the
    CPU (a decoder alone leaves the encoder's random weights, never used); refused
    where it is another kind of VAE or makes other latents than the model's
    (``latent_channels`` at 1/``scale`` of the image's size)."""
    from diffusers import AutoencoderTiny
    from safetensors import SafetensorError

    from sdtrt.export.networks import is_tiny_vae
    from sdtrt.models import quiet_loaders

    where = Path(path)
    if not where.is_dir():
        raise ModelNotFoundError(
            f"preview VAE {path} is not a folder: give a TAESD's (madebyollin/taesd's "
            "diffusers folder, or one holding taesd_encoder and taesd_decoder .safetensors)"
        )
    halves = _taesd_halves(where, allow_pickle=False, decoder_alone=True)
    try:
        with quiet_loaders():
            if halves:
                vae = _taesd_from_halves(halves)
            else:
                settings = AutoencoderTiny.load_config(where)
                if not is_tiny_vae(settings):
                    raise InvalidInputError(
                        f"preview VAE {path} is {settings.get('_class_name', 'a VAE')}, not "
                        "a TAESD (AutoencoderTiny): previews are decoded by the model's own "
                        "VAE where none is given"
                    )
                vae = AutoencoderTiny.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as exc:
        raise InvalidInputError(f"could not load the preview VAE {path}: {_gist(exc)}") from None
    theirs = 2 ** (len(vae.config.decoder_block_out_channels) - 1)
    if vae.config.latent_channels != latent_channels or theirs != scale:
        raise InvalidInputError(
            f"preview VAE {path} decodes latents of {vae.config.latent_channels} channels at "
            f"1/{theirs} of the image's size; this model's are {latent_channels} channels at "
            f"1/{scale}: a TAESD made for another model"
        )
    return vae.eval()


def _taesd_halves(where: Path, allow_pickle: bool, decoder_alone: bool = False) -> dict[str, Path]:
    """TAESD's own files in the folder ``where``, as madebyollin/taesd and ComfyUI's
    vae_approx keep them: ``taesd_encoder`` and ``taesd_decoder``, .safetensors (or .pth:
    pickles, read only with ``allow_pickle``); ``decoder_alone``: the decoder may come
    without the encoder (previews decode only). None for a file, or for a diffusers folder
    (madebyollin/taesd holds both kinds: it is read as diffusers')."""
    if not where.is_dir() or any((where / f).is_file() for f in ("config.json", "vae/config.json")):
        return {}
    found = {}
    for half in ("encoder", "decoder"):
        for suffix in (".safetensors", ".pth"):
            if (where / f"taesd_{half}{suffix}").is_file():
                found[half] = where / f"taesd_{half}{suffix}"
                break
    for file in found.values():
        if file.suffix != ".safetensors":
            _check_pickle(file, allow_pickle, "TAESD file")
    if len(found) == 1 and not (decoder_alone and "decoder" in found):
        (alone,) = found.values()
        if decoder_alone:
            raise InvalidInputError(
                f"{where} holds {alone.name} alone: previews are decoded by taesd_decoder"
            )
        raise InvalidInputError(
            f"{where} holds {alone.name} alone: img2img needs TAESD's encoder and decoder "
            "(taesd_encoder and taesd_decoder .safetensors), or its diffusers folder"
        )
    return found


def _taesd_from_halves(halves: dict[str, Path]) -> Any:
    """An AutoencoderTiny (TAESD's architecture: diffusers' defaults) holding TAESD's own
    encoder and decoder files, their layers renamed as diffusers' conversion script renames
    them: ``encoder.layers.N``, and the decoder's one down (its first layer, a clamp, is in
    diffusers' forward)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    state = {}
    for half, path in halves.items():
        if path.suffix == ".safetensors":
            weights = load_file(str(path))
        else:  # allowed by the caller
            weights = torch.load(path, map_location="cpu", weights_only=True)
        for key, value in weights.items():
            layer, rest = key.split(".", 1)
            if half == "decoder":
                layer = str(int(layer) - 1)
            state[f"{half}.layers.{layer}.{rest}"] = value
    vae: Any = AutoencoderTiny(latent_channels=state["decoder.layers.0.weight"].shape[1])
    if "encoder" in halves:
        vae.load_state_dict(state, strict=True)
        return vae
    missing, unexpected = vae.load_state_dict(state, strict=False)  # a decoder alone
    if unexpected or any(not key.startswith("encoder.") for key in missing):
        raise KeyError(f"not TAESD's decoder: {[*unexpected, *missing][:3]}")
    return vae


def fuse_loras(
    components: dict[str, Any], loras: tuple[tuple[str, float], ...], allow_pickle: bool
) -> None:
    """Fuse each (file, scale) of ``loras`` into the UNet and text encoder, in place."""
    try:
        import peft  # noqa: F401  diffusers loads LoRA layers through it
    except ImportError:
        raise BackendUnavailableError(
            "LoRA weights are loaded by diffusers through peft, which is not installed: "
            "pip install 'sdtrt[lora]'"
        ) from None
    from sdtrt.models import quiet_loaders

    pipe = _container(components)
    names = []
    for index, (path, _) in enumerate(loras):
        name = f"lora{index}"
        state_dict = _read(Path(path), allow_pickle)
        # diffusers warns of every other adapter's keys as "missing" when a second loads.
        with quiet_loaders(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pipe.load_lora_weights(state_dict, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                # one line per layer that does not fit
                raise InvalidInputError(
                    f"LoRA {path} does not fit this model: {_gist(exc)}"
                ) from None
        changed = [part for part, found in pipe.get_list_adapters().items() if name in found]
        if not changed:
            raise InvalidInputError(
                f"LoRA {path} changes no layer of this model: none of its keys name a layer "
                "of this UNet or text encoder (a LoRA for another architecture, SDXL or SD 2 "
                "for SD 1.x?)"
            )
        logger.info("LoRA %s: %s", path, ", ".join(changed))
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay


def load_embeddings(
    components: dict[str, Any], embeddings: tuple[tuple[str, str], ...], allow_pickle: bool
) -> None:
    """Add each (file, token) of ``embeddings`` to the tokenizer and text encoder, in place:
    a token of n vectors becomes TOKEN, TOKEN_1 ... TOKEN_{n-1}, which prompts get in its
    place (``runtime.steps.token_ids``)."""
    from sdtrt.models import quiet_loaders

    pipe = _container(components)
    width = components["text_encoder"].config.hidden_size
    for path, token in embeddings:
        state_dict = _read(Path(path), allow_pickle, "embedding")
        vectors = state_dict.get("string_to_param", {}).get("*")  # A1111's .pt
        if vectors is None and len(state_dict) == 1:  # A1111's safetensors, diffusers'
            vectors = next(iter(state_dict.values()))
        if not isinstance(vectors, torch.Tensor):
            raise InvalidInputError(
                f"embedding {path} is in no layout diffusers reads: A1111's (string_to_param, "
                "or one emb_params tensor) or diffusers' (one token and its vectors); its keys: "
                + ", ".join(sorted(map(str, state_dict))[:8])
            )
        if vectors.shape[-1] != width:
            raise InvalidInputError(
                f"embedding {path} holds vectors of {vectors.shape[-1]} values, and this "
                f"text encoder's are {width} (SD 1.x's are 768, SD 2.x's 1024): it was made "
                "for another model"
            )
        with quiet_loaders():
            try:
                pipe.load_textual_inversion(state_dict, token=token)
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                message = f"embedding {path} as {token!r}: {_gist(exc)}"
                if "already in tokenizer vocabulary" in str(exc):
                    message = (
                        f"embedding {path}: {token!r} is already in the tokenizer's "
                        "vocabulary (another embedding's token, or a word of its own): call "
                        "it by another word with FILE:TOKEN"
                    )
                raise InvalidInputError(message) from None
        vectors = sum(t == token or t.startswith(f"{token}_") for t in _added(components))
        logger.info("embedding %s: %r, %d vectors", path, token, vectors)


def _gist(exc: Exception) -> str:
    """The start of a loader's message, which may list every layer or print tensors."""
    lines = str(exc).strip().splitlines()
    more = f" (and {len(lines) - 2} more lines)" * (len(lines) > 2)
    return " ".join(lines[:2])[:300] + more


def _added(components: dict[str, Any]) -> dict[str, int]:
    tokenizer = components["tokenizer"]
    special = set(tokenizer.all_special_tokens)
    return {t: i for t, i in tokenizer.added_tokens_encoder.items() if t not in special}


def _container(components: dict[str, Any]) -> Any:
    """A diffusers pipeline around ``components`` (the same objects): its LoRA and textual
    inversion loaders work on a pipeline's components."""
    from sdtrt.models import quiet_loaders

    with quiet_loaders():  # the pipeline module's import: transformers' torchvision notes
        from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _check_pickle(path: Path, allow_pickle: bool, what: str) -> None:
    """A file that is not .safetensors is a pickle: read only where the user allows it."""
    if not allow_pickle:
        raise InvalidInputError(
            f"{what} {path} is not .safetensors: a pickle, and unpickling runs code from the "
            "file; load it with --allow-pickle (ModelSource(allow_pickle=True)) if you trust it"
        )


def _read(path: Path, allow_pickle: bool, what: str = "LoRA") -> dict[str, Any]:
    """A LoRA's or embedding's tensors: safetensors, or a pickle (``.bin``, ``.pt``,
    ``.ckpt``) with ``allow_pickle`` only, read by torch's restricted unpickler."""
    if not path.is_file():
        raise ModelNotFoundError(f"{what} file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            message = f"{what} {path} is not a readable safetensors file: {exc}"
            raise InvalidInputError(message) from None
    _check_pickle(path, allow_pickle, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's and torch's own error types
        raise InvalidInputError(f"{what} {path} is not a readable tensor file: {exc}") from None
    if not isinstance(state, dict):
        raise InvalidInputError(f"{what} {path} holds a {type(state).__name__}, not tensors")
    return dict(state.get("state_dict", state))
