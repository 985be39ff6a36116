"""Where a model's PyTorch weights come from (``ModelSource``): a built-in name, a diffusers
folder, a Hub id already in the Hugging Face cache, or a single checkpoint file, with the VAE,
LoRAs, embeddings and clip skip applied as it loads; and the command line's spellings of
those ("FILE[:SCALE]", "FILE[:TOKEN]"). Light, as sdtrt/options.py: no torch."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import InvalidInputError
from sdtrt.options import check_integer

logger = logging.getLogger(__name__)


def expand_home(path: str | None) -> str | None:
    """ "~/..." where no shell expanded it (quoted, a script's variable, a YAML or unit
    file): the home folder, not a folder named "~". Other values as they are."""
    return os.path.expanduser(path) if isinstance(path, str) else path


def is_hub_id(name: str) -> bool:
    """owner/name, where no folder owner/ is here: a Hugging Face Hub repository's id."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name.split("/")[0]).exists()


def hub_snapshot(repo_id: str) -> str | None:
    """The copy of Hub repository ``repo_id`` that diffusers or ``hf download`` left in the
    Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub), as diffusers finds it offline;
    None where it is not there. Reads the cache only, never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return str(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


@dataclass(frozen=True)
class ModelSource:
    """Where a model's PyTorch weights come from: a built-in name, a diffusers folder, or a
    single checkpoint file in the original Stable Diffusion layout."""

    model: str
    """tiny | sd15-random | sd21-random | a diffusers folder | a .safetensors/.ckpt file |
    a Hub id (owner/name) already in the Hugging Face cache, which becomes that folder."""
    variant: str | None = None
    """A folder's weight variant (``model.fp16.safetensors``...); None: the default
    weights, else the only variant there is (fp16 first)."""
    config: str | None = None
    """A single file's architecture: a diffusers folder of the same model, or the original
    YAML config. Needed (nothing is downloaded)."""
    allow_pickle: bool = False
    """Load a .ckpt/.bin checkpoint, which is a pickle: unpickling runs code from the file."""
    vae: str | None = None
    """Another VAE in place of the model's: a single file in the original layout (A1111's
    "SD VAE", such as ``vae-ft-mse-840000-ema-pruned.safetensors``) or a diffusers VAE
    folder (AutoencoderKL, or TAESD's AutoencoderTiny; or a folder of TAESD's own
    ``taesd_encoder`` and ``taesd_decoder`` files); the exports, engines and the cache
    carry it."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA files (.safetensors, in diffusers', kohya's or PEFT's layout, as diffusers'
    ``load_lora_weights`` reads them) and their scales, fused into the weights when they
    load, as diffusers' ``fuse_lora`` does: exports, engines and the cache carry them."""
    embeddings: tuple[tuple[str, str], ...] = ()
    """Textual inversion embeddings (.safetensors, A1111's or diffusers' layout) and the
    word each is called by in prompts (by default the file's name without its extension,
    as A1111 does: ``EasyNegative.safetensors`` is "EasyNegative"), added to the tokenizer
    and the text encoder when they load, as diffusers' ``load_textual_inversion`` does."""
    clip_skip: int | None = None
    """CLIP layers left out at the end of the text encoder, as diffusers' ``clip_skip``: 1
    takes the penultimate layer's output (what web UIs call "Clip skip 2"), for prompt and
    negative prompt alike. The text encoder is cut when it loads, so exports, engines and
    the cache carry it. None or 0: every layer."""

    def __post_init__(self) -> None:
        if not str(self.model).strip():  # an unset "$MODEL": not the current folder
            raise InvalidInputError("the model is empty: give a model name, folder or file")
        if self.clip_skip is not None:
            check_integer("clip skip", self.clip_skip, 0)
        object.__setattr__(self, "loras", tuple(_lora(entry) for entry in self.loras))
        object.__setattr__(self, "embeddings", tuple(map(_embedding, self.embeddings)))
        object.__setattr__(self, "model", expand_home(self.model))  # Python, a YAML file
        object.__setattr__(self, "config", expand_home(self.config))
        object.__setattr__(self, "vae", expand_home(self.vae))
        if is_hub_id(self.model) and (snapshot := hub_snapshot(self.model)):
            logger.info("%s: the copy in the Hugging Face cache, %s", self.model, snapshot)
            object.__setattr__(self, "model", snapshot)

    def describe(self) -> str:
        extra = [f"variant {self.variant}"] * bool(self.variant)
        extra += [f"config {self.config}"] * bool(self.config)
        extra += [f"VAE {self.vae}"] * bool(self.vae)
        extra += [f"LoRA {path} at {scale:g}" for path, scale in self.loras]
        extra += [f"embedding {path} as {token!r}" for path, token in self.embeddings]
        extra += [f"clip skip {self.clip_skip}"] * bool(self.clip_skip)
        return self.model + (f" ({', '.join(extra)})" if extra else "")


def parse_lora(text: str) -> tuple[str, float]:
    """ "FILE[:SCALE]" -> (FILE, SCALE), the scale 1.0 where none is given (a path that
    holds a colon keeps it when what follows is not a number)."""
    path, _, scale = text.rpartition(":")
    try:
        number = float(scale)
    except ValueError:
        return _lora((text, 1.0))
    return _lora((path, number) if path else (text, 1.0))


def _lora(entry: object) -> tuple[str, float]:
    """A (file, scale) pair, checked: a file named, a finite scale."""
    if isinstance(entry, str):
        entry = (entry, 1.0)
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise InvalidInputError(f"a LoRA is (file, scale), got {entry!r}")
    path, scale = entry
    if not isinstance(path, str) or not path.strip():
        raise InvalidInputError(f"a LoRA's file must be a path, got {path!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"LoRA {path}: the scale must be a finite number, got {scale!r}")
    return str(expand_home(path)), float(scale)


def parse_embedding(text: str) -> tuple[str, str]:
    """ "FILE[:TOKEN]" -> (FILE, TOKEN), the token by default the file's name without its
    extension (a colon followed by a path stays part of the file)."""
    path, _, token = text.rpartition(":")
    if not path or "/" in token:
        return _embedding(text)
    return _embedding((path, token))


def _embedding(entry: object) -> tuple[str, str]:
    """A (file, token) pair, checked: a file named; a token of one word."""
    if isinstance(entry, str):
        entry = (entry, Path(entry).stem)
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise InvalidInputError(f"an embedding is (file, token), got {entry!r}")
    path, token = entry
    if not isinstance(path, str) or not path.strip():
        raise InvalidInputError(f"an embedding's file must be a path, got {path!r}")
    if not isinstance(token, str) or not token or token != token.strip() or " " in token:
        raise InvalidInputError(f"embedding {path}: the token must be one word, got {token!r}")
    return str(expand_home(path)), token


def as_source(model: str | ModelSource) -> ModelSource:
    return model if isinstance(model, ModelSource) else ModelSource(str(model))
