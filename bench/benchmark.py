"""``sdtrt bench``: img2img latency per stage and end to end, throughput, loop overhead and
the price of batching cond/uncond, for each backend and diffusers' own pipeline in one
process on the same inputs."""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from sdtrt.bench.config import PEERS, BenchConfig, split_row
from sdtrt.bench.report import STAGES
from sdtrt.bench.timing import StageTimer, peak_rss_mb, percentiles, reset_peak_memory, synchronize
from sdtrt.engine.torch_backend import IN_PLACE_SWITCHES, TorchBackend
from sdtrt.errors import ModelNotFoundError, SdtrtError
from sdtrt.export.networks import ModelDims
from sdtrt.options import DTYPES, SAMPLE_IMAGE, SEED_PROMPT, CacheOptions, TorchOptions
from sdtrt.runtime.clock import stopwatch
from sdtrt.runtime.guidance import cutoff_callback

logger = logging.getLogger(__name__)
BACK_TO_BACK = 8  # UNet calls per timed run, on a GPU (_unet_batching)


@dataclass(frozen=True)
class ArgLayout:
    """A tensor argument as a compiled function's guards see it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    inference: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ArgLayout:
        return cls(tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.is_inference())

    def new(self, device: torch.device, fill: float | None = None) -> torch.Tensor:
        """A tensor of this layout: random normal, or filled with ``fill``."""
        with torch.inference_mode(self.inference):
            out = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)
            return out.normal_() if fill is None else out.fill_(fill)


def _recording(
    fn: Callable[..., Any], seen: list[ArgLayout], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """``fn``, remembering the layouts of the first three tensors of its first call since
    ``seen`` was emptied (a UNet's sample, timestep and hidden states, as sdtrt and diffusers
    call it) and, in ``options``, its other keyword arguments. Host work alone (a call
    inside a CUDA graph capture records nothing into the graph), and once: the calls after
    pay one check, not the 6 us a recording takes."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            seen[:] = [ArgLayout.of(t) for t in tensors[:3]]
            if options is not None:
                options.update((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))
        return fn(*args, **kwargs)

    return call


@dataclass
class Target:
    """One thing to time: a callable img2img run plus the hooks that feed the timer."""

    name: str
    run: Callable[[int, int], int]  # (batch, seed) -> UNet calls
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]  # untimed, for batching
    denoise_ms: Callable[[], float]  # the last run's denoising loop, wall time
    device: torch.device
    dims: ModelDims  # C of encoder_hidden_states, pixels per latent
    close: Callable[[], None] = lambda: None  # undoes what the target patched
    run_args: list[ArgLayout] | None = None
    """Set where the UNet compiles per shape: the layouts of the (sample, timestep, hidden)
    the run passed it, recorded at each batch's first call. The bench calls such a UNet
    only so, since another shape, layout or timestep dtype would compile again (inductor
    took 31-40 s per new shape for the tiny UNet on the development CPU) and turn torch's
    default compile dynamic for the rows after."""


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every row of ``config``, measured: the record (``complete``). ``progress`` gets the
    record so far after each row, ``complete`` False until the last (the CLI writes it, so
    that a run cut short keeps the rows it finished)."""
    from sdtrt.bench.environment import environment
    from sdtrt.export.folder import is_onnx_folder
    from sdtrt.models import load_components

    log = log or (lambda line: print(line, file=sys.stderr))
    exported = None
    components: dict[str, Any] | None = None
    if is_onnx_folder(config.model):
        from sdtrt.export.folder import ExportedModel

        exported = ExportedModel.open_as(config.source)
        if config.reference is not None or not exported.adopted:
            components = exported.source_components(config.reference)
    else:
        components = load_components(config.source)
    image = _sample_image(config.height, config.width)
    rows: dict[str, list[dict[str, Any]]] = {}
    record: dict[str, Any] = {"environment": environment(), "config": asdict(config)}

    def so_far() -> dict[str, Any]:
        done = [row for backend in config.backends for row in rows.get(backend, [])]
        return {**record, "complete": False, "results": done}

    # Graph backends run first: they export from the fp32 CPU weights, which the torch and
    # diffusers targets move to the GPU or to fp16 in place. Rows keep the order asked for.
    pytorch_rows = ("torch", *PEERS)
    for backend in sorted(config.backends, key=lambda row: split_row(row)[0] in pytorch_rows):
        log(f"bench: {backend} ...")
        reset_peak_memory()
        timer = StageTimer("cpu")
        try:
            target = _make_target(backend, config, components, exported, image, timer)
        except SdtrtError as exc:
            log(f"bench: {backend} skipped: {exc}")
            rows[backend] = [{"backend": backend, "status": "skipped", "reason": str(exc)}]
            if progress is not None:
                progress(so_far())
            continue
        timer.device = target.device
        rows[backend] = []
        try:
            for batch in config.batches:
                row = _measure(target, batch, config, timer)
                rows[backend].append(row)
                log(_progress(backend, row))
        except Exception as exc:  # one row's failure (no compiler, out of memory) is its own
            logger.exception("bench: %s failed", backend)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"bench: {backend} failed: {reason}")
            rows[backend].append({"backend": backend, "status": "failed", "reason": reason})
        finally:
            target.close()
        del target
        if progress is not None:
            progress(so_far())
    return {**so_far(), "complete": True}


def _progress(backend: str, row: dict[str, Any]) -> str:
    """One log line per measured row, with the figures a run cut short still leaves behind."""
    stages, first = row["stages_ms"], row["first_run_ms"]
    return (
        f"bench: {backend} batch {row['batch']}: p50 {row['end_to_end_ms']['p50']:.1f} ms, "
        f"UNet {stages['unet_per_call']:.2f} ms/call, "
        f"host {stages['loop_overhead_per_step']:.3f} ms/step"
        + ("" if first is None else f", first run {first:.0f} ms")
    )


def _measure(target: Target, batch: int, config: BenchConfig, timer: StageTimer) -> dict[str, Any]:
    device = target.device
    if target.run_args is not None:
        target.run_args.clear()  # recorded anew at this batch's first UNet call
    first_run_ms = None
    for i in range(config.warmup):
        with stopwatch(lambda: synchronize(device)) as watch:
            target.run(batch, i)
        first_run_ms = first_run_ms or watch.ms
    samples: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    unet_calls = 0
    unet_batching = _unet_batching(target, batch, config)
    for i in range(config.repeats):
        timer.reset()
        with stopwatch(lambda: synchronize(device)) as watch:
            unet_calls = target.run(batch, 1000 + i)
        samples.append(watch.ms)
        timer.settle()
        stages["text_encoder"].append(timer.totals["text_encoder"])
        stages["vae_encoder"].append(timer.totals["vae_encoder"])
        stages["vae_decoder"].append(timer.totals["vae_decoder"])
        calls, unet_ms = timer.calls["unet"], timer.totals["unet"]
        if not calls and unet_calls:
            # Whole-step graphs: the UNet runs inside each replay, where no clock can stop.
            # Its time is its time alone (the same call replayed as a graph, timed above),
            # and the rest of each step is the loop's.
            calls, unet_ms = unet_calls, unet_calls * unet_batching["one_2b_call_ms"]
        calls = max(calls, 1)
        stages["unet_per_call"].append(unet_ms / calls)
        stages["loop_overhead_per_step"].append((target.denoise_ms() - unet_ms) / calls)
    e2e = percentiles(samples)
    profile = None
    if config.profile is not None:  # untimed: the stage clocks would add their own syncs
        from sdtrt.bench.trace import profiled

        timer.enabled = False
        path = Path(config.profile) / f"{target.name}-b{batch}.trace.json"
        profile = profiled(lambda: target.run(batch, 2000), device, path)
        timer.enabled = True
    return {
        "backend": target.name,
        "status": "ok",
        "batch": batch,
        "unet_calls": unet_calls,
        "stages_ms": {k: statistics.median(v) for k, v in stages.items()},
        "end_to_end_ms": e2e,
        "images_per_s": batch / (e2e["p50"] / 1e3),
        # The first warm-up run: what a compiler or a graph capture adds is this minus p50.
        "first_run_ms": first_run_ms,
        "unet_batching": unet_batching,
        "profile": profile,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        ),
    }


def _unet_batching(target: Target, batch: int, config: BenchConfig) -> dict[str, Any]:
    """One UNet call on 2B against two calls on B: what batching cond and uncond buys (a
    compiled row: the 2B call alone)."""
    device, hidden = target.device, target.dims.text_hidden_size
    f = target.dims.vae_scale_factor
    h, w = config.height // f, config.width // f
    t = torch.tensor(500.0)

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.randn(n, 4, h, w, device=device),
            t.to(device),
            torch.randn(n, 77, hidden, device=device),
        )

    # On a GPU, calls back to back between two synchronisations: one call's time, without
    # the launch latency and the wait of a synchronisation around each (tens of us, which
    # a step-graph row's loop overhead, UNet-free loop time, would lose).
    back_to_back = BACK_TO_BACK if device.type == "cuda" else 1

    def timed(fn: Callable[[], Any]) -> float:
        runs = []
        for _ in range(max(2, min(config.repeats, 5)) + 1):
            with stopwatch(lambda: synchronize(device)) as watch:
                for _ in range(back_to_back):
                    fn()
            runs.append(watch.ms / back_to_back)
        return statistics.median(runs[1:])  # the first is a warm-up

    two_calls: float | None = None
    if target.run_args is not None:  # compiled: the run's own call, and no other
        sample, timestep, states = target.run_args
        args = (sample.new(device), timestep.new(device, fill=500), states.new(device))
        one_call = timed(lambda: target.unet(*args))
    else:
        both, half = inputs(2 * batch), inputs(batch)
        one_call = timed(lambda: target.unet(*both))
        two_calls = timed(lambda: (target.unet(*half), target.unet(*half)))
    return {
        "one_2b_call_ms": one_call,
        "two_b_calls_ms": two_calls,
        "speedup": None if two_calls is None else two_calls / one_call,
    }


def _call_options(config: BenchConfig, batch: int, seed: int) -> dict[str, Any]:
    """The same call for our pipeline and diffusers' (their signatures agree on these)."""
    return {
        "strength": config.strength,
        "num_inference_steps": config.steps,
        "guidance_scale": config.guidance,
        "generator": torch.Generator().manual_seed(seed),
        "num_images_per_prompt": batch,
        "output_type": "np",
    }


def _sample_image(height: int, width: int) -> Any:
    import PIL.Image

    with PIL.Image.open(SAMPLE_IMAGE) as image:
        return image.convert("RGB").resize((width, height))


def _make_target(
    backend: str,
    config: BenchConfig,
    components: dict[str, Any] | None,
    exported: Any,
    image: Any,
    timer: StageTimer,
) -> Target:
    base = split_row(backend)[0]
    if base in ("torch", *PEERS) and config.device == "cuda":
        if not torch.cuda.is_available():
            from sdtrt.errors import BackendUnavailableError

            raise BackendUnavailableError("no CUDA device on this machine")
    if backend in PEERS:
        components = _pytorch(components, config, backend)
        return _diffusers_target(config, components, image, timer, backend)
    from sdtrt.models import source_record
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    options = config.options_for(backend)
    if exported is not None and base != "torch":
        pipe = Img2ImgPipeline.from_pretrained(
            exported.root, options, config.scheduler, show_progress=False
        )
        dims = exported.dims
    else:
        components = _pytorch(components, config, backend)
        if isinstance(options, TorchOptions) and any(
            getattr(options, switch) for switch in IN_PLACE_SWITCHES
        ):
            # These change the UNet module in place: this row's own copy, so that the other
            # rows (and diffusers') run the UNet as it was given.
            components = {**components, "unet": copy.deepcopy(components["unet"])}
        dims = ModelDims.from_components(components)
        pipe = Img2ImgPipeline.from_components(
            components,
            options,
            config.scheduler,
            cache=CacheOptions(source=source_record(config.source)),
            show_progress=False,
        )
    engine = pipe.backend
    raw_unet = engine.unet
    for stage, method in STAGE_METHODS.items():  # each network's calls timed
        setattr(engine, method, timer.wrap(stage, getattr(engine, method)))
    last: dict[str, float] = {}

    cutoff = cutoff_callback(config.guidance_cutoff)  # every row's, diffusers' too

    def run(batch: int, seed: int) -> int:
        out = pipe(
            SEED_PROMPT, image, **_call_options(config, batch, seed), callback_on_step_end=cutoff
        )
        last["denoise"] = out.timings_ms["denoise"]
        return out.unet_calls

    target = Target(backend, run, raw_unet, lambda: last["denoise"], engine.device, dims)
    if isinstance(options, TorchOptions) and options.compile_unet:
        target.run_args = []
        torch_engine = cast(TorchBackend, engine)  # the torch options' backend
        torch_engine.unet_call = _recording(torch_engine.unet_call, target.run_args)
    return target


# A stage's name and the backend method that runs it.
STAGE_METHODS = {
    "text_encoder": "encode_text",
    "unet": "unet",
    "vae_encoder": "encode_image",
    "vae_decoder": "decode_latents",
}


def _pytorch(components: dict[str, Any] | None, config: BenchConfig, backend: str) -> Any:
    if components is None:
        raise ModelNotFoundError(
            f"{config.model} records no PyTorch model for the {backend} rows: name one with "
            "--reference"
        )
    return components


# diffusers' documented torch.compile of the UNet (docs: optimization/fp16, "torch.compile"),
# with reduce-overhead's CUDA graphs instead of max-autotune: on the H100, max-autotune of
# the SD 1.5 UNet did not finish within 5 minutes.
DIFFUSERS_COMPILE: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True}


def _diffusers_target(
    config: BenchConfig,
    components: dict[str, Any],
    image: Any,
    timer: StageTimer,
    backend: str,
) -> Target:
    from diffusers import StableDiffusionImg2ImgPipeline

    from sdtrt.runtime.schedulers import diffusers_scheduler

    # diffusers' own scheduler class: what a user of diffusers gets.
    scheduler = diffusers_scheduler(config.scheduler, components["scheduler"].config)
    pipe: Any = StableDiffusionImg2ImgPipeline(
        **{**components, "scheduler": scheduler},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(config.device)
    if config.dtype != "fp32":  # diffusers warns on every dtype cast, so only when needed
        pipe = pipe.to(dtype=getattr(torch, DTYPES[config.dtype]))
    pipe.set_progress_bar_config(disable=True)
    if backend == "diffusers-compile":
        # A copy: channels-last and the compiled module must not change the other rows' UNet.
        unet_copy = copy.deepcopy(pipe.unet).to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(unet_copy, **DIFFUSERS_COMPILE)
    dtype = pipe.unet.dtype
    marks: dict[str, float] = {}
    encode = timer.wrap("vae_encoder", pipe.vae.encode)

    def encode_and_mark(*args: Any, **kwargs: Any) -> Any:
        out = encode(*args, **kwargs)
        synchronize(config.device)  # the loop starts when the encoder's work is done
        marks["loop_start"] = time.perf_counter()
        return out

    cutoff = cutoff_callback(config.guidance_cutoff)  # every row's, diffusers' too
    tensor_inputs = ["latents"] if cutoff is None else cutoff.tensor_inputs  # or diffusers'

    def step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if cutoff is not None:
            kwargs = cutoff(_pipe, i, _t, kwargs)
        marks["steps"] = i + 1  # one UNet call per step (guidance batched)
        if i == _pipe.num_timesteps - 1:  # only the last step waits for the GPU
            synchronize(config.device)
            marks["loop_end"] = time.perf_counter()
        return kwargs

    # Timed methods over the modules' own, put back by ``close``: the modules are shared.
    patched = [
        (module, name, vars(module).get(name))
        for module, name in (
            (pipe.text_encoder, "forward"),
            (pipe.unet, "forward"),
            (pipe.vae, "encode"),
            (pipe.vae, "decode"),
        )
    ]
    pipe.text_encoder.forward = timer.wrap("text_encoder", pipe.text_encoder.forward)
    unet_forward = pipe.unet.forward
    pipe.unet.forward = timer.wrap("unet", unet_forward)
    run_args: list[ArgLayout] | None = None
    run_options: dict[str, Any] = {}  # diffusers' other arguments (return_dict=False...)
    if backend == "diffusers-compile":
        run_args = []
        pipe.unet.forward = _recording(pipe.unet.forward, run_args, run_options)
    pipe.vae.encode = encode_and_mark
    pipe.vae.decode = timer.wrap("vae_decoder", pipe.vae.decode)

    def close() -> None:
        for module, name, own in patched:
            if own is None:
                delattr(module, name)
            else:  # an attribute of the instance before (a compiled module's forward)
                setattr(module, name, own)

    def run(batch: int, seed: int) -> int:
        with warnings.catch_warnings():
            # diffusers' own num_images_per_prompt path warns that the one image is
            # repeated for each prompt ("deprecated"); the call is its documented one.
            warnings.filterwarnings("ignore", "You have passed", FutureWarning)
            pipe(
                SEED_PROMPT,
                image,
                **_call_options(config, batch, seed),
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs,
            )
        return int(marks["steps"])

    @torch.no_grad()
    def unet(sample: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> Any:
        options = {**run_options, "encoder_hidden_states": hidden.to(dtype)}
        return unet_forward(sample.to(dtype), t, **options)

    return Target(
        backend,
        run,
        unet,
        lambda: (marks["loop_end"] - marks["loop_start"]) * 1e3,
        torch.device(config.device),
        ModelDims.from_components(components),
        close,
        run_args=run_args,
    )
