"""What ``sdtrt bench`` measures: one frozen config, checked whole before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from sdtrt.errors import InvalidInputError
from sdtrt.options import (
    BACKENDS,
    GRAPH_BACKENDS,
    TRT_FAMILIES,
    UNET_SWITCHES,
    BackendOptions,
    OrtOptions,
    TensorRTOptions,
    TorchOptions,
    default_precision,
)
from sdtrt.source import ModelSource

# diffusers' own pipeline, plain and with its UNet under torch.compile (the peer a user
# would pick: diffusers' documented speed-up).
PEERS = ("diffusers", "diffusers-compile")
# ModelSource's fields and BenchConfig's names for them (``config`` is ``model_config`` here:
# the bench's own config is another thing).
SOURCE_FIELDS = {
    f.name: "model_config" if f.name == "config" else f.name for f in fields(ModelSource)
}
BENCH_BACKENDS = (*BACKENDS, *PEERS)
# A row may add switches to its backend, so that variants run side by side in one bench
# (one model load, one process, ratios between them): "torch+step-graphs+compile" is the
# torch backend with --step-graphs and --compile on, whatever the other rows run.
_GRAPH_SWITCHES = ("cuda-graphs", "step-graphs")
ROW_SWITCHES = {
    "torch": (*_GRAPH_SWITCHES, *(flag.removeprefix("--") for flag in UNET_SWITCHES.values())),
    **{family: _GRAPH_SWITCHES for family in TRT_FAMILIES},
}


def split_row(row: str) -> tuple[str, frozenset[str]]:
    """A row's backend and its own switches ("torch+compile" -> torch, {compile})."""
    backend, *switches = row.split("+")
    return backend, frozenset(switches)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"
    """Built-in name, diffusers folder, or exported folder (graphs used as they are)."""
    variant: str | None = None
    """A diffusers folder's weight variant (see ModelSource)."""
    model_config: str | None = None
    """A single checkpoint file's architecture (see ModelSource)."""
    allow_pickle: bool = False
    vae: str | None = None
    """Another VAE in place of the model's (see ModelSource)."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA files and scales fused into the weights (see ModelSource)."""
    embeddings: tuple[tuple[str, str], ...] = ()
    """Textual inversion files and their tokens (see ModelSource)."""
    clip_skip: int | None = None
    """Text encoder layers left out at the end (see ModelSource)."""
    reference: str | None = None
    """The PyTorch model (name or diffusers folder) of an ONNX folder that records none
    (optimum's): the torch and diffusers rows run it."""

    @property
    def source(self) -> ModelSource:
        return ModelSource(**{name: getattr(self, ours) for name, ours in SOURCE_FIELDS.items()})

    backends: tuple[str, ...] = ("torch", "onnxruntime", "diffusers")
    batches: tuple[int, ...] = (1,)
    """Images per prompt; the UNet runs on twice this (cond + uncond) under guidance."""
    height: int = 512
    width: int = 512
    steps: int = 50
    strength: float = 0.8
    scheduler: str = "lms"
    guidance: float = 8.0
    """The seed's; 1 or less runs the prompt row alone (LCM-LoRA's recipe: B rows a call)."""
    guidance_cutoff: float | None = None
    """The share of the steps run under guidance (every row, diffusers' too, runs sdtrt's
    GuidanceCutoffCallback); None: guided throughout."""
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
    engine_dir: str | None = None
    """TensorRT rows: the engines ``sdtrt build --engine-dir`` wrote there."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if split_row(b)[0] not in BENCH_BACKENDS]
        if unknown or not self.backends:
            raise InvalidInputError(
                f"backends must be among {', '.join(BENCH_BACKENDS)}, got {', '.join(unknown)}"
            )
        for row in self.backends:
            backend, switches = split_row(row)
            allowed = ROW_SWITCHES.get(backend, ())
            if not switches <= set(allowed):
                takes = "+" + ", +".join(allowed) if allowed else "no switches"
                raise InvalidInputError(f"bench row {row}: a {backend} row takes {takes}")
        if len(set(self.backends)) != len(self.backends):
            raise InvalidInputError(f"a backend is named more than once: {self.backends}")
        if not self.batches or min(self.batches) < 1:
            raise InvalidInputError(f"batch sizes must be >= 1, got {self.batches}")
        if self.repeats < 1 or self.warmup < 0:
            raise InvalidInputError("repeats must be >= 1 and warm-up >= 0")
        from sdtrt.runtime.guidance import check_guidance_cutoff
        from sdtrt.runtime.inputs import (
            Limits,
            check_size,
            check_steps_and_guidance,
            resolve_start_step,
        )

        check_steps_and_guidance(self.steps, self.guidance)
        check_guidance_cutoff(self.guidance_cutoff)
        resolve_start_step(self.steps, self.strength, None)
        check_size(self.height, self.width, 8)
        Limits.from_env().check(
            steps=self.steps, batch=max(self.batches), height=self.height, width=self.width
        )
        if self.profile is not None and Path(self.profile).is_file():
            raise InvalidInputError(f"--profile {self.profile} is a file: name a folder for traces")
        backends = {split_row(b)[0] for b in self.backends}
        graph = backends & set(GRAPH_BACKENDS)
        if self.precision is not None and not graph:
            raise InvalidInputError(
                "--precision picks exported graphs: it applies to onnxruntime and tensorrt, "
                "and neither is benchmarked"
            )
        for flag, given in (
            ("--cuda-graphs", self.cuda_graphs),
            ("--step-graphs", self.step_graphs),
        ):
            if given and not {"torch", *TRT_FAMILIES} & backends:
                raise InvalidInputError(f"{flag} applies to the torch and TensorRT backends")
        for field, flag in UNET_SWITCHES.items():
            if getattr(self, field) and "torch" not in backends:
                raise InvalidInputError(f"{flag} applies to the torch backend")
        if self.engine_dir is not None and not set(TRT_FAMILIES) & backends:
            raise InvalidInputError("--engine-dir applies to the TensorRT backends' rows")
        for row in self.backends:
            if row not in PEERS:
                self.options_for(row)  # refuses a combination that cannot run

    def options_for(self, row: str) -> BackendOptions:
        """The typed options each sdtrt row runs with in this bench: the flags given for
        all rows, and the row's own switches."""
        backend, switches = split_row(row)
        cuda_graphs = self.cuda_graphs or "cuda-graphs" in switches
        step_graphs = self.step_graphs or "step-graphs" in switches
        if backend == "torch":
            return TorchOptions(
                device=self.device,
                dtype=self.dtype,
                cuda_graphs=cuda_graphs,
                step_graphs=step_graphs,
                **{
                    field: getattr(self, field) or flag.removeprefix("--") in switches
                    for field, flag in UNET_SWITCHES.items()
                },
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
            cuda_graphs=cuda_graphs,
            step_graphs=step_graphs,
            engine_dir=self.engine_dir,
        )
