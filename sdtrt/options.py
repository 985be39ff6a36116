"""Every option a user can give sdtrt, typed, with the name lists they are checked against.

Light on purpose (no torch, no diffusers): the command line builds its help from here, and
the API, the bench, the factory and the server build their options here, once. Each
backend has its own frozen options class; ``backend_options`` turns what a user typed into
the right one and refuses, with one line, an option that does not apply to the backend.
Where a model's weights come from is sdtrt/source.py's ``ModelSource``; the server's
options are serve/options.py's ``ServeOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sdtrt.errors import InvalidInputError

if TYPE_CHECKING:
    from sdtrt.source import ModelSource

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


def check_integer(what: str, value: object, minimum: int) -> None:
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
