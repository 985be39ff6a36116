"""Every option a user can give sdtrt, typed, with the name lists they are checked against.

Light on purpose (no torch, no diffusers): the command line builds its help from here, and
the API, the bench, the factory and the server build their options here, once. Each
backend has its own frozen options class; ``backend_options`` turns what a user typed into
the right one and refuses, with one line, an option that does not apply to the backend.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sdtrt.errors import InvalidInputError

logger = logging.getLogger(__name__)

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"
SEED_PROMPT = "A colorful dancer, nat geo photo"
DEFAULT_STRENGTH = 0.8  # the seed's start step 10 of 50
SCHEDULER_NAMES = (
    "lms", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms_karras",
    "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "ddim_trailing", "lcm", "tcd",
)  # fmt: skip
BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")
GRAPH_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
# The two TensorRT families: standard TensorRT (datacenter and all CUDA GPUs; engines tied
# to one GPU model) and TensorRT for RTX (Ampere, Ada, Blackwell: compute capability 8.0,
# 8.6, 8.9, 12.x; engines built ahead of time without a GPU, portable across their targets).
TRT_FAMILIES = ("tensorrt", "tensorrt-rtx")
# Compute capabilities TensorRT-RTX can target (its ComputeCapability enum, 1.7).
RTX_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
PRECISIONS = ("fp32", "fp16")
DTYPES = {"fp32": "float32", "fp16": "float16"}
DEVICES = ("cpu", "cuda")
ORT_OPTIMIZATION_LEVELS = ("auto", "disable", "basic", "extended", "layout", "all")
# The torch backend's UNet switches (TorchOptions' fields) and their command-line flags; a
# bench row names one by its flag without the dashes (torch+compile).
UNET_SWITCHES = {
    "channels_last": "--channels-last",
    "fuse_qkv": "--fuse-qkv",
    "compile_unet": "--compile",
}
# Opset 20 is the lowest at which torch 2.13's exporter gave a valid SD UNet (17 did not).
DEFAULT_OPSET = 20


def _integer(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{what} must be an integer >= {minimum}, got {value!r}")


def parse_sizes(text: str, what: str = "sizes") -> tuple[tuple[int, int], ...]:
    """ "512x512,768x512" -> ((512, 512), (768, 512)): height x width, comma-separated."""
    try:
        sizes = tuple(
            (int(h), int(w)) for h, w in (s.lower().split("x") for s in text.split(",") if s)
        )
    except ValueError:
        raise InvalidInputError(f"{what}: HxW,HxW (e.g. 512x768), got {text!r}") from None
    return sizes


def one_of(what: str, value: object, allowed: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is among ``allowed``, naming them (options' own check)."""
    if value not in allowed:
        raise InvalidInputError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def one_gpu_hint(device: object) -> str | None:
    """For ``cuda:N``, torch's name for one GPU of several, what to do instead; None for
    any other value."""
    if not (isinstance(device, str) and device.startswith("cuda:")):
        return None
    n = device.partition(":")[2]
    return (
        f"sdtrt runs on one GPU, the first visible one: for GPU {n} give device cuda "
        f"with CUDA_VISIBLE_DEVICES={n} (Ray Serve sets it for each replica)"
    )


def check_device(value: object) -> None:
    """cpu or cuda; for ``cuda:N`` how to choose that GPU."""
    if hint := one_gpu_hint(value):
        raise InvalidInputError(f"device {value!r}: {hint}")
    one_of("device", value, DEVICES)


@dataclass(frozen=True)
class TorchOptions:
    """The PyTorch backend: diffusers' modules, the accuracy reference."""

    backend: ClassVar[str] = "torch"
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "fp32"
    """fp32 or fp16: the modules are cast to it in place (as diffusers' ``.to()`` does)."""
    cuda_graphs: bool = False
    """Replay the UNet as a CUDA graph (needs ``device="cuda"``)."""
    step_graphs: bool = False
    """Replay each whole denoising step (UNet, guidance, scheduler update) as one CUDA
    graph (every scheduler as Stable Diffusion configures it but dpmpp_2m_sde_karras;
    it and other settings replay the UNet alone, as ``cuda_graphs`` does). Needs
    ``device="cuda"``."""
    # Ways to a faster UNet (issue 15), each its own switch so that each is measured alone.
    # They change the UNet module in place, as diffusers' own calls do.
    channels_last: bool = False
    """The UNet's weights in channels-last memory format (NHWC convolutions)."""
    fuse_qkv: bool = False
    """diffusers' ``fuse_qkv_projections()``: one matmul for query, key and value."""
    compile_unet: bool = False
    """``torch.compile`` the UNet (inductor, no CUDA graphs of its own: sdtrt captures the
    compiled UNet in its graphs). It compiles on the first call of each shape."""

    def __post_init__(self) -> None:
        check_device(self.device)
        one_of("dtype", self.dtype, tuple(DTYPES))
        for flag, given in (
            ("--cuda-graphs", self.cuda_graphs),
            ("--step-graphs", self.step_graphs),
        ):
            if given and self.device != "cuda":
                raise InvalidInputError(f"{flag} needs --device cuda on the torch backend")


@dataclass(frozen=True)
class OrtOptions:
    """The ONNX Runtime backend, on an exported folder's graphs."""

    backend: ClassVar[str] = "onnxruntime"
    precision: str = "fp32"
    """Which exported graphs: fp32 (exact on CPU, the fastest there) or fp16."""
    device: str | None = None
    """cpu or cuda (the CUDA provider of onnxruntime-gpu); None: cuda where it is installed."""
    optimization: str = "auto"
    """Graph optimisation level; auto: all for the VAE, basic for the rest (measured)."""
    threads: int = 0
    """Intra-op threads; 0 lets ONNX Runtime choose."""
    memory_arena: bool = True
    spinning: bool = False
    """Worker threads busy-wait after each run. Off (measured, bench/README.md): on CPU the
    busy threads hold the cores the PyTorch work between runs needs (the scheduler step,
    the image processor): 2.5-2.9x end to end on the tiny model at 128 px, the same on SD 1.5."""

    def __post_init__(self) -> None:
        one_of("precision", self.precision, PRECISIONS)
        if self.device is not None:
            check_device(self.device)
        one_of("ONNX Runtime optimisation", self.optimization, ORT_OPTIMIZATION_LEVELS)
        if self.threads < 0:
            raise InvalidInputError(f"ONNX Runtime threads must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class TensorRTOptions:
    """The TensorRT backends: engines built from an exported folder's graphs."""

    backend: ClassVar[str] = "tensorrt"
    family: str = "tensorrt"
    """tensorrt (module ``tensorrt``) or tensorrt-rtx (module ``tensorrt_rtx``)."""
    precision: str = "fp16"
    """Which graphs the engines come from (engines are strongly typed): fp16 or fp32."""
    cuda_graphs: bool = False
    """Replay the UNet's enqueue as a CUDA graph."""
    step_graphs: bool = False
    """Replay each whole denoising step (the UNet's enqueue, guidance, the scheduler's
    update) as one CUDA graph; steps that cannot be tabulated replay the UNet alone."""
    engine_dir: str | None = None
    """Where the engines are (``sdtrt build --engine-dir``); None: the exported folder's
    ``tensorrt/``."""
    build_missing: bool = False
    """Build engines that are missing (the cache does; a user's folder is built by
    ``sdtrt build``, and a mismatch there is an error)."""

    def __post_init__(self) -> None:
        one_of("TensorRT family", self.family, TRT_FAMILIES)
        one_of("precision", self.precision, PRECISIONS)
        if self.engine_dir is not None and not Path(self.engine_dir).is_dir():
            raise InvalidInputError(
                f"engine folder {self.engine_dir} does not exist or is not a folder: build "
                f"engines into it with `sdtrt build --model MODEL --engine-dir {self.engine_dir}`"
            )


BackendOptions = TorchOptions | OrtOptions | TensorRTOptions
_OPTION_CLASSES: dict[str, type[BackendOptions]] = {
    "torch": TorchOptions,
    "onnxruntime": OrtOptions,
    "tensorrt": TensorRTOptions,
}


def default_options(backend: str) -> BackendOptions:
    one_of("backend", backend, BACKENDS)
    if backend in TRT_FAMILIES:
        return TensorRTOptions(family=backend)
    return _OPTION_CLASSES[backend]()


def default_precision(backend: str) -> str:
    """The graphs a graph backend uses when none is named: fp16 engines for TensorRT (its
    product), fp32 for ONNX Runtime (exact and fastest on CPU). One rule for every verb."""
    one_of("graph backend", backend, GRAPH_BACKENDS)
    return OrtOptions.precision if backend == "onnxruntime" else TensorRTOptions.precision


def backend_options(
    backend: str,
    *,
    precision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cuda_graphs: bool = False,
    step_graphs: bool = False,
    channels_last: bool = False,
    fuse_qkv: bool = False,
    compile_unet: bool = False,
    ort_optimization: str | None = None,
    ort_threads: int | None = None,
    engine_dir: str | None = None,
) -> BackendOptions:
    """What a user gave (None or False: not given) as the backend's typed options. An option
    the backend has no use for is refused, naming the backend and what it does take."""
    one_of("backend", backend, BACKENDS)

    def refuse(option: str, why: str) -> InvalidInputError:
        return InvalidInputError(f"{option} does not apply to the {backend} backend: {why}")

    if engine_dir is not None and backend not in TRT_FAMILIES:
        raise refuse("--engine-dir", "it names the folder of TensorRT engines (sdtrt build)")
    if backend != "onnxruntime":
        if ort_optimization is not None:
            raise refuse("--ort-optimization", "it sets ONNX Runtime sessions")
        if ort_threads is not None:
            raise refuse("--ort-threads", "it sets ONNX Runtime sessions")
    switches = {"channels_last": channels_last, "fuse_qkv": fuse_qkv, "compile_unet": compile_unet}
    if backend == "torch":
        if precision is not None:
            raise refuse("--precision", "it picks exported graphs; the torch backend takes --dtype")
        return TorchOptions(
            device=device or TorchOptions.device,
            dtype=dtype or TorchOptions.dtype,
            cuda_graphs=cuda_graphs,
            step_graphs=step_graphs,
            **switches,
        )
    for field, given in switches.items():
        if given:
            raise refuse(UNET_SWITCHES[field], "it changes the PyTorch UNet module (the torch one)")
    if dtype is not None:
        raise refuse("--dtype", "graph backends take --precision (which exported graphs run)")
    if backend == "onnxruntime":
        for flag, given in (("--cuda-graphs", cuda_graphs), ("--step-graphs", step_graphs)):
            if given:
                raise refuse(flag, "CUDA graphs are for the torch and tensorrt backends")
        return OrtOptions(
            precision=precision or OrtOptions.precision,
            device=device,
            optimization=ort_optimization or OrtOptions.optimization,
            threads=OrtOptions.threads if ort_threads is None else ort_threads,
        )
    if device == "cpu":
        raise refuse("--device cpu", "TensorRT runs on an NVIDIA GPU only")
    return TensorRTOptions(
        family=backend,
        precision=precision or TensorRTOptions.precision,
        cuda_graphs=cuda_graphs,
        step_graphs=step_graphs,
        engine_dir=engine_dir,
    )


@dataclass(frozen=True)
class Img2ImgJob:
    """One ``sdtrt img2img`` run: what to make and where to write it."""

    prompt: str = SEED_PROMPT
    image: str | None = None
    """Input image file; None: the sample picture that ships with sdtrt."""
    negative_prompt: str | None = None
    strength: float | None = None
    start_step: int | None = None
    steps: int = 50
    guidance: float = 8.0
    eta: float = 0.0
    """DDIM's per-step noise (TCD's gamma), in [0, 1]; other schedulers ignore it."""
    seed: int = 32
    height: int | None = None
    """None: the input image's height, rounded down to the model's size unit."""
    width: int | None = None
    batch: int = 1
    timesteps: tuple[int, ...] | None = None
    """A schedule of one's own in place of ``steps`` (diffusers' ``timesteps``)."""
    sigmas: tuple[float, ...] | None = None
    """Or its sigmas (diffusers' ``sigmas``; one more than the steps: where the last ends)."""
    guidance_cutoff: float | None = None
    """The share of the steps run under guidance, in [0, 1] (diffusers' SDCFGCutoffCallback's
    ``cutoff_step_ratio``); the rest on the prompt's rows alone. None: guided throughout."""
    out: str = "out/img2img.png"
    """PNG, JPEG or WebP by extension; a batch writes NAME-0.EXT, NAME-1.EXT, ..."""

    @property
    def schedule_steps(self) -> int:
        """The steps the job runs at most: its custom schedule's, else ``steps``."""
        if self.timesteps is not None:
            return len(self.timesteps)
        if self.sigmas is not None:
            return max(1, len(self.sigmas) - 1)
        return self.steps

    def output_paths(self) -> list[Path]:
        out = Path(self.out)
        if self.batch == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(self.batch)]

    def check(self) -> None:
        """Everything about the job that can be known without the image or the model (the
        size limits need the image: ``api.img2img`` checks them once it is read)."""
        from sdtrt.fileio import check_output_file, image_format
        from sdtrt.runtime.guidance import check_guidance_cutoff
        from sdtrt.runtime.inputs import (
            check_eta,
            check_seed,
            check_size,
            check_steps_and_guidance,
            resolve_start_step,
        )

        check_steps_and_guidance(self.steps, self.guidance)
        check_eta(self.eta)
        check_guidance_cutoff(self.guidance_cutoff)
        if self.image is not None and not str(self.image).strip():
            raise InvalidInputError(
                "--image is empty: give an image file, or leave --image out for the sample"
            )
        if self.timesteps is not None and self.sigmas is not None:
            raise InvalidInputError("give timesteps or sigmas, not both")
        if self.timesteps is None and self.sigmas is None:  # else the scheduler counts them
            resolve_start_step(self.steps, self.strength, self.start_step)
        check_seed(self.seed)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise InvalidInputError(f"batch must be >= 1, got {self.batch}")
        if self.height is not None or self.width is not None:  # the model's unit comes later
            check_size(self.height or 8, self.width or 8, 8)
        for path in self.output_paths():
            check_output_file(path, "--out")
        image_format(self.out)


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
            _integer("clip skip", self.clip_skip, 0)
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


def parse_numbers(text: str) -> tuple[float, ...]:
    """ "999,850,736" -> (999.0, 850.0, 736.0): a schedule given on the command line."""
    try:
        numbers = tuple(float(part) for part in text.split(","))
    except ValueError:
        numbers = ()
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise InvalidInputError(f"expected numbers separated by commas (999,850,736), got {text!r}")
    return numbers


def parse_integers(text: str) -> tuple[int, ...]:
    """ "999,850,736" -> (999, 850, 736): timesteps given on the command line."""
    numbers = parse_numbers(text)
    if not all(n == int(n) for n in numbers):
        raise InvalidInputError(f"expected integers separated by commas, got {text!r}")
    return tuple(int(n) for n in numbers)


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


@dataclass(frozen=True)
class CacheOptions:
    """Where a PyTorch model is exported (once) when a graph backend runs it."""

    opset: int = DEFAULT_OPSET
    cache_dir: str | None = None
    """None: ``$SDTRT_CACHE``, else ``$XDG_CACHE_HOME/sdtrt``, else ``~/.cache/sdtrt``."""
    source: str | ModelSource = "in-memory"
    """The model's name, folder or file, recorded in the export's manifest."""


@dataclass(frozen=True)
class ExportOptions:
    """``sdtrt export``: which graphs to write."""

    precisions: tuple[str, ...] = PRECISIONS
    """fp32 (``model.onnx``, what ONNX Runtime and optimum load) and fp16
    (``model_fp16.onnx``, what TensorRT engines are built from)."""
    opset: int = DEFAULT_OPSET
    vae_precision: str | None = None
    """Force the VAE's graphs to one precision (fp32 for VAEs that overflow in fp16)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise InvalidInputError(
                f"precision must list {' and/or '.join(PRECISIONS)}, "
                f"got {', '.join(self.precisions)}"
            )
        if self.vae_precision is not None:
            one_of("VAE precision", self.vae_precision, PRECISIONS)
        if self.opset < 18:
            raise InvalidInputError(f"opset must be >= 18 (20 recommended), got {self.opset}")


# The shape TensorRT tunes for when none is given: (batch, height, width), each moved to
# the nearest end of its range when it lies outside.
OPT_DEFAULTS = {"batch": 1, "height": 512, "width": 512}


@dataclass(frozen=True)
class BuildRanges:
    """What engines must accept, in the user's units: images per request and pixels."""

    batch: tuple[int, int] = (1, 4)
    height: tuple[int, int] = (256, 768)
    width: tuple[int, int] = (256, 768)
    opt_batch: int | None = None
    opt_height: int | None = None
    opt_width: int | None = None
    """The shape TensorRT tunes for; None: batch 1 and 512 px, or the nearest end of the
    range when it lies outside it (``height=(256, 256)`` is tuned at 256)."""
    static: bool = False
    """min = opt = max at the opt values: the lowest latency, one shape only."""

    def opt(self) -> tuple[int, int, int]:
        """(batch, height, width) TensorRT tunes for."""

        def pick(given: int | None, default: int, span: tuple[int, int]) -> int:
            return min(max(default, span[0]), span[1]) if given is None else given

        return (
            pick(self.opt_batch, OPT_DEFAULTS["batch"], self.batch),
            pick(self.opt_height, OPT_DEFAULTS["height"], self.height),
            pick(self.opt_width, OPT_DEFAULTS["width"], self.width),
        )

    def check(self, size_multiple: int) -> None:
        for what, (low, high), opt in zip(
            ("batch", "height", "width"),
            (self.batch, self.height, self.width),
            self.opt(),
            strict=True,
        ):
            if not 1 <= low <= high:
                raise InvalidInputError(f"{what} range {low}-{high} must satisfy 1 <= min <= max")
            if not self.static and not low <= opt <= high:
                raise InvalidInputError(f"opt {what} {opt} is outside its range {low}-{high}")
            if what != "batch":
                for value in (low, high, opt):
                    if value % size_multiple:
                        raise InvalidInputError(
                            f"{what} {value} is not a multiple of {size_multiple} px, which "
                            "these graphs need"
                        )

    def extremes(self) -> dict[str, tuple[int, int, int]]:
        """(batch, height, width) at min, opt and max."""
        opt = self.opt()
        if self.static:
            return {"min": opt, "opt": opt, "max": opt}
        return {
            "min": (self.batch[0], self.height[0], self.width[0]),
            "opt": opt,
            "max": (self.batch[1], self.height[1], self.width[1]),
        }


@dataclass(frozen=True)
class BuildOptions:
    """``sdtrt build``: the profile and builder settings of the engines."""

    ranges: BuildRanges = BuildRanges()
    optimization_level: int = 3
    """TensorRT builder optimisation level, 0-5 (higher: longer builds, faster engines)."""
    workspace_gb: float | None = None
    """Workspace memory pool limit; None leaves TensorRT's default (the GPU's memory)."""
    targets: tuple[str, ...] = ()
    """TensorRT-RTX only: the compute capabilities the engines run on ("8.6", "8.9"...);
    empty: TensorRT-RTX's portable default (8.0, 8.6, 8.9, 12.0 and later); ("gpu",): this
    machine's GPU."""

    def __post_init__(self) -> None:
        for target in self.targets:
            if target not in (*RTX_TARGETS, "gpu") or (target == "gpu" and len(self.targets) > 1):
                raise InvalidInputError(
                    f"target {target!r}: give compute capabilities among "
                    f"{', '.join(RTX_TARGETS)}, or gpu (alone) for this machine's GPU"
                )
        if not 0 <= self.optimization_level <= 5:
            raise InvalidInputError(
                f"optimisation level must be in 0-5, got {self.optimization_level}"
            )
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InvalidInputError(f"workspace must be > 0 GB, got {self.workspace_gb}")

    def flags(self) -> dict[str, float | int | None]:
        return {"optimization_level": self.optimization_level, "workspace_gb": self.workspace_gb}


SERVE_POLICIES = ("step", "request", "single")


@dataclass(frozen=True)
class ServeOptions:
    """``sdtrt serve``: how requests are batched and what the HTTP side accepts."""

    policy: str = "step"
    """step: one UNet call per iteration for every active job of a size (continuous
    batching); request: identical requests within the queue delay run as one batch (what
    Triton and PyTriton do); single: one request at a time. The load benchmark compares."""
    max_rows: int | None = None
    """UNet rows per call ([uncond, cond] per guided image); None: the TensorRT engine's
    profile maximum, else 16."""
    max_queue: int = 64
    """Requests waiting beyond this are refused with 429 and Retry-After."""
    intra_op_threads: int | None = 1
    """On a CPU device: PyTorch's intra-op threads in the worker thread (its
    ``torch.set_num_threads``); None: PyTorch's own (one per core). 1 by default: a second
    thread with its own OpenMP pool next to the one that loaded the model oversubscribes
    the cores, and then every small operator waits for its pool to wake (tiny model, 2
    cores: 3.5x slower requests); big models on many cores gain from more."""
    queue_delay: float = 0.05
    """request policy: seconds the oldest request waits for identical ones."""
    timeout: float = 300.0
    """Seconds a request may take in all; past it the answer is 504 and its job is dropped."""
    host: str = "127.0.0.1"
    """Loopback unless told otherwise."""
    port: int = 8000
    api_key: str | None = None
    """Required on /v1 and /metrics when set (Authorization: Bearer KEY or X-API-Key)."""
    max_body_mb: float = 16.0
    drain_timeout: float = 30.0
    """On SIGTERM: seconds the requests in flight get to finish before the server exits."""
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    """(height, width) image sizes at which every shape the server can form runs once
    before /ready says 200: the UNet at each row count up to ``max_rows``, the VAE at each
    number of images up to it, the text encoder at each number of prompts up to it times
    the number of sizes (jobs admitted together are encoded together). Where a shape costs
    on first sight (a CUDA graph captured, ``--compile`` compiling, TensorRT-RTX compiling
    kernels), the first requests then do not pay for it; the largest batches also prove
    the memory holds them. Also takes "HxW,HxW". Empty: one small request warms up, at the
    sample picture's size."""
    steps: int = Img2ImgJob.steps
    """A request's ``num_inference_steps`` when it sends none (as ``guidance`` its
    ``guidance_scale``, ``strength`` its strength when it sends neither strength nor
    start_step, and the pipeline's scheduler its scheduler): an LCM-LoRA server's few
    unguided steps need not be sent with every request."""
    guidance: float = Img2ImgJob.guidance
    strength: float = DEFAULT_STRENGTH
    guidance_cutoff: float | None = None
    """A request's ``guidance_cutoff`` when it sends none (a request sends 1 to be guided
    throughout); None: guided throughout."""
    model_name: str = "img2img"
    """The model's name in the Open Inference Protocol's paths (``/v2/models/NAME/infer``):
    what Triton and KServe clients ask for (a KServe InferenceService's name)."""
    priority_levels: int = 0
    """Priority levels a request may name (Triton's schedule-policy ``priority``): 1 is the
    highest, ``priority_levels`` the lowest and a request's default (priority 0). A waiting
    request of a higher level is admitted before those of lower ones, which do not take
    the UNet rows it waits for; within a level, in arrival order. 0: none (a request's
    priority must then be 0)."""
    grpc_port: int | None = None
    """Also serve the Open Inference Protocol over gRPC on this port, at ``host`` (Triton
    serves it on 8001; 0: a free port). None: HTTP only. Needs ``pip install
    'sdtrt[grpc]'``."""

    def __post_init__(self) -> None:
        from sdtrt.runtime.guidance import check_guidance_cutoff
        from sdtrt.runtime.inputs import check_steps_and_guidance, resolve_start_step

        check_steps_and_guidance(self.steps, self.guidance)
        check_guidance_cutoff(self.guidance_cutoff)
        resolve_start_step(self.steps, self.strength, None)
        one_of("policy", self.policy, SERVE_POLICIES)
        if not isinstance(self.model_name, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name
        ):
            raise InvalidInputError(
                "model name must be letters, digits, '_', '.' and '-' (one path segment), "
                f"got {self.model_name!r}"
            )
        sizes = self.warmup_sizes
        if isinstance(sizes, str):
            sizes = parse_sizes(sizes, "warm-up sizes")
        object.__setattr__(self, "warmup_sizes", tuple(tuple(size) for size in sizes))
        for size in self.warmup_sizes:
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise InvalidInputError(
                    f"warm-up sizes are (height, width) pairs of positive integers, got {size!r}"
                )
        if self.intra_op_threads is not None:
            _integer("intra-op threads", self.intra_op_threads, 1)
        _integer("max_queue", self.max_queue, 1)  # 0: nothing, the warm-up included, could run
        _integer("priority_levels", self.priority_levels, 0)
        for name in ("port", "grpc_port"):
            port = getattr(self, name)
            if port is not None:
                _integer(name, port, 0)
                if port > 65535:
                    raise InvalidInputError(f"{name} must be in [0, 65535], got {port}")
        if self.grpc_port == self.port != 0:
            raise InvalidInputError(f"grpc_port and port are both {self.port}: give two ports")
        if self.max_rows is not None and self.max_rows < 2:
            raise InvalidInputError(
                f"max rows must be >= 2 (one guided image), got {self.max_rows}"
            )
        for name in ("queue_delay", "drain_timeout"):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("timeout", "max_body_mb"):  # 0: every request refused
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)!r}")
