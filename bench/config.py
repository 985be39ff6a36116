"""What ``sdtrt bench`` measures: one frozen config, checked whole before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import InvalidInputError
from sdtrt.options import (
    BACKENDS,
    GRAPH_BACKENDS,
    TRT_FAMILIES,
    BackendOptions,
    ModelSource,
    OrtOptions,
    TensorRTOptions,
    TorchOptions,
    default_precision,
)

# diffusers' own pipeline, plain and with its UNet under torch.compile (the peer a user
# would pick: diffusers' documented speed-up).
PEERS = ("diffusers", "diffusers-compile")
BENCH_BACKENDS = (*BACKENDS, *PEERS)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"
    """Built-in name, diffusers folder, or exported folder (graphs used as they are)."""
    variant: str | None = None
    """A diffusers folder's weight variant (see ModelSource)."""
    model_config: str | None = None
    """A single checkpoint file's architecture (see ModelSource)."""
    allow_pickle: bool = False
    reference: str | None = None
    """The PyTorch model (name or diffusers folder) of an ONNX folder that records none
    (optimum's): the torch and diffusers rows run it."""

    @property
    def source(self) -> ModelSource:
        return ModelSource(self.model, self.variant, self.model_config, self.allow_pickle)

    backends: tuple[str, ...] = ("torch", "onnxruntime", "diffusers")
    batches: tuple[int, ...] = (1,)
    """Images per prompt; the UNet runs on twice this (cond + uncond)."""
    height: int = 512
    width: int = 512
    steps: int = 50
    strength: float = 0.8
    scheduler: str = "lms"
    device: str = "cpu"
    """torch and diffusers: cpu or cuda."""
    dtype: str = "fp32"
    """torch and diffusers: fp32 or fp16."""
    precision: str | None = None
    """Graph backends: which exported graphs (fp32, fp16); None: each backend's default."""
    cuda_graphs: bool = False
    step_graphs: bool = False
    """torch and TensorRT: each whole denoising step as one CUDA graph (runtime/step_graph.py)."""
    channels_last: bool = False
    fuse_qkv: bool = False
    compile_unet: bool = False
    """torch: the UNet tuned as TorchOptions says (one switch each, measured alone)."""
    profile: str | None = None
    """A folder: one more run per row under torch.profiler, its trace written there and its
    GPU busy and idle time summed up (bench/trace.py)."""
    warmup: int = 2
    repeats: int = 10
    ort_optimization: str = "auto"
    """ONNX Runtime graph optimisation level (auto, disable, basic, extended, layout, all)."""
    ort_threads: int = 0
    """ONNX Runtime intra-op threads; 0 lets it choose."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BENCH_BACKENDS]
        if unknown or not self.backends:
            raise InvalidInputError(
                f"backends must be among {', '.join(BENCH_BACKENDS)}, got {', '.join(unknown)}"
            )
        if len(set(self.backends)) != len(self.backends):
            raise InvalidInputError(f"a backend is named more than once: {self.backends}")
        if not self.batches or min(self.batches) < 1:
            raise InvalidInputError(f"batch sizes must be >= 1, got {self.batches}")
        if self.repeats < 1 or self.warmup < 0:
            raise InvalidInputError("repeats must be >= 1 and warm-up >= 0")
        from sdtrt.runtime.inputs import Limits, check_size, resolve_start_step

        resolve_start_step(self.steps, self.strength, None)
        check_size(self.height, self.width, 8)
        Limits.from_env().check(
            steps=self.steps, batch=max(self.batches), height=self.height, width=self.width
        )
        if self.profile is not None and Path(self.profile).is_file():
            raise InvalidInputError(f"--profile {self.profile} is a file: name a folder for traces")
        graph = [b for b in self.backends if b in GRAPH_BACKENDS]
        if self.precision is not None and not graph:
            raise InvalidInputError(
                "--precision picks exported graphs: it applies to onnxruntime and tensorrt, "
                "and neither is benchmarked"
            )
        for flag, given in (
            ("--cuda-graphs", self.cuda_graphs),
            ("--step-graphs", self.step_graphs),
        ):
            if given and not {"torch", *TRT_FAMILIES} & set(self.backends):
                raise InvalidInputError(f"{flag} applies to the torch and TensorRT backends")
        for flag, given in (
            ("--channels-last", self.channels_last),
            ("--fuse-qkv", self.fuse_qkv),
            ("--compile", self.compile_unet),
        ):
            if given and "torch" not in self.backends:
                raise InvalidInputError(f"{flag} applies to the torch backend")
        for backend in self.backends:
            if backend not in PEERS:
                self.options_for(backend)  # refuses a combination that cannot run

    def options_for(self, backend: str) -> BackendOptions:
        """The typed options each sdtrt backend runs with in this bench."""
        if backend == "torch":
            return TorchOptions(
                device=self.device,
                dtype=self.dtype,
                cuda_graphs=self.cuda_graphs,
                step_graphs=self.step_graphs,
                channels_last=self.channels_last,
                fuse_qkv=self.fuse_qkv,
                compile_unet=self.compile_unet,
            )
        if backend == "onnxruntime":
            return OrtOptions(
                precision=self.precision or default_precision(backend),
                optimization=self.ort_optimization,
                threads=self.ort_threads,
            )
        return TensorRTOptions(
            family=backend,
            precision=self.precision or default_precision(backend),
            cuda_graphs=self.cuda_graphs,
            step_graphs=self.step_graphs,
        )
