"""The img2img pipeline: the seed notebook's loop, started from the noised input image.

Order of work, as in diffusers' StableDiffusionImg2ImgPipeline: check inputs -> preprocess
the image -> encode the prompts -> timesteps from the start step -> encode and noise the
image -> denoising loop -> decode. Random draws happen in diffusers' order (VAE sample,
then the noise, then per-step draws of stochastic schedulers), so with the torch backend
and the same generator the images equal diffusers' own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import torch
from diffusers.image_processor import VaeImageProcessor
from torch.profiler import record_function
from tqdm.auto import tqdm

from sdtrt.engine.base import Backend
from sdtrt.errors import InvalidInputError, NonFiniteOutputError
from sdtrt.export.networks import ModelDims
from sdtrt.options import BackendOptions, CacheOptions, default_options
from sdtrt.runtime.callbacks import (
    callback_inputs,
    guidance_left,
    step_end_outputs,
    tabulated_cutoff,
)
from sdtrt.runtime.clock import stopwatch
from sdtrt.runtime.inputs import (
    CallPlan,
    Limits,
    check_eta,
    check_generator,
    check_steps_and_guidance,
    image_input,
    is_integer,
    latents_input,
    latents_size,
    output_size,
    resolve_start_step,
)
from sdtrt.runtime.prompts import Texts, call_texts
from sdtrt.runtime.schedulers import (
    check_scheduler_fits,
    custom_schedule,
    make_scheduler,
    step_kwargs,
)
from sdtrt.runtime.step_graph import StepGraphs
from sdtrt.runtime.step_table import StepTable, tabulate
from sdtrt.runtime.steps import (
    noised_latents,
    start_timesteps,
    step,
    text_batch,
    token_ids,
    unet_input,
)
from sdtrt.source import ModelSource, as_source

T = TypeVar("T")
P = ParamSpec("P")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # diffusers' names


@dataclass
class Img2ImgOutput:
    images: Any
    """PIL images, a float numpy array [B, H, W, 3] in [0, 1], a float tensor [B, 3, H, W]
    in [0, 1] (output type "pt"), or latents [B, 4, h, w]."""
    unet_calls: int
    """UNet calls the loop made (one per timestep run, each on the whole 2B batch; B rows
    where guidance is off: a scale of 1 or less, or the steps after a guidance cutoff)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: text_encoder, vae_encoder, denoise, vae_decoder."""


def _one_call_at_a_time(
    method: Callable[Concatenate[Img2ImgPipeline, P], T],
) -> Callable[Concatenate[Img2ImgPipeline, P], T]:
    @functools.wraps(method)
    def serialised(self: Img2ImgPipeline, *args: P.args, **kwargs: P.kwargs) -> T:
        with self.one_call:
            return method(self, *args, **kwargs)

    return serialised


class Img2ImgPipeline:
    def __init__(
        self,
        *,
        backend: Backend,
        tokenizer: Any,
        scheduler: Any,
        dims: ModelDims,
        scaling_factor: float,
        show_progress: bool = True,
        limits: Limits | None = None,
        model_scheduler_config: Any = None,
        scheduler_name: str | None = None,
    ) -> None:
        self.backend = backend
        self.dims = dims
        """The model's sizes, and whether its VAE's encoder gives a distribution to sample
        (AutoencoderKL) or the latents themselves (TAESD)."""
        self.limits = limits or Limits.from_env()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.model_scheduler_config = model_scheduler_config or scheduler.config
        """The model's own scheduler config, what every named scheduler is made from (not
        ``scheduler.config``, which carries its name's settings: a server started with
        dpmpp_2m_sde_karras made a request's dpmpp_2m with Karras sigmas and the SDE
        solver)."""
        self.scheduler_name = scheduler_name
        """The name ``scheduler`` was made from, where the pipeline was built by name."""
        self.scaling_factor = scaling_factor
        self.show_progress = show_progress
        self.step_graphs: StepGraphs | None = None
        self._interrupt = False
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self.one_call = threading.Lock()
        """Held for each call: the scheduler keeps the loop's state (its step index, the
        multistep solvers' history) and the backends their buffers (CUDA graphs' static
        inputs, TensorRT's execution context). Threads that share a pipeline (a web
        framework's worker pool) wait for each other; sdtrt serve batches them instead, its
        worker holding this for each batched step, so that a direct call on the same
        pipeline waits for the step and the step for the call."""
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=dims.vae_scale_factor, do_convert_rgb=True
        )

    @property
    def text_shape(self) -> tuple[int, int]:
        """(tokens, width) of the text encoder's output: what prompt embeddings must be."""
        return (self.dims.max_tokens, self.dims.text_hidden_size)

    @classmethod
    def from_components(
        cls,
        components: dict[str, Any],
        backend: BackendOptions | str = "torch",
        scheduler: str = "lms",
        *,
        cache: CacheOptions = CacheOptions(),
        show_progress: bool = True,
    ) -> Img2ImgPipeline:
        """Build from ``load_components``' dict on ``backend`` (a name, for its defaults,
        or typed options); graph backends export into the cache described by ``cache``.
        The torch backend moves the modules to its device and dtype in place, as diffusers'
        ``pipeline.to()`` does."""
        from sdtrt.engine.factory import backend_from_components

        config = components["scheduler"].config
        return cls(
            backend=backend_from_components(components, _options(backend), cache),
            tokenizer=components["tokenizer"],
            scheduler=make_scheduler(scheduler, config),
            dims=ModelDims.from_components(components),
            scaling_factor=components["vae"].config.scaling_factor,
            show_progress=show_progress,
            model_scheduler_config=config,
            scheduler_name=scheduler,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | ModelSource,
        backend: BackendOptions | str | None = None,
        scheduler: str = "lms",
        *,
        cache: CacheOptions | None = None,
        show_progress: bool = True,
        **diffusers_kwargs: Any,
    ) -> Img2ImgPipeline:
        """Build from what a user names: an exported folder (``sdtrt export``, or optimum's
        Hugging Face ONNX layout; runs from the graphs alone, ONNX Runtime by default), a
        local diffusers folder or a built-in model name (torch by default; graph backends
        export into the cache). diffusers' own keywords (``torch_dtype``, ``variant``...)
        are refused with the sdtrt way to say the same."""
        from sdtrt.engine.factory import backend_from_exported
        from sdtrt.export.folder import ExportedModel, is_onnx_folder
        from sdtrt.models import load_components, source_record

        if diffusers_kwargs:
            raise InvalidInputError(_diffusers_keywords(diffusers_kwargs))
        source = as_source(str(model) if isinstance(model, Path) else model)
        if not is_onnx_folder(source.model):
            cache = cache or CacheOptions(source=source_record(source))
            return cls.from_components(
                load_components(source),
                backend or "torch",
                scheduler,
                cache=cache,
                show_progress=show_progress,
            )
        exported = ExportedModel.open_as(source)
        config = exported.scheduler_config()
        return cls(
            backend=backend_from_exported(exported, _options(backend or "onnxruntime")),
            tokenizer=exported.tokenizer(),
            scheduler=make_scheduler(scheduler, config),
            dims=exported.dims,
            scaling_factor=exported.scaling_factor,
            show_progress=show_progress,
            model_scheduler_config=config,
            scheduler_name=scheduler,
        )

    def to(self, *args: Any, **kwargs: Any) -> NoReturn:
        """diffusers' ``pipe.to("cuda")``: here the device and dtype are chosen once, when
        the pipeline is built (engines and graphs are made for them)."""
        raise InvalidInputError(
            "the device and dtype are backend options, chosen when the pipeline is built: "
            "Img2ImgPipeline.from_pretrained(model, TorchOptions(device='cuda', dtype='fp16'))"
            " (from sdtrt import TorchOptions); the graph backends take OrtOptions or "
            "TensorRTOptions"
        )

    # inference_mode rather than diffusers' no_grad: each tensor op then skips autograd's
    # version counting, which halves the Python cost of a scheduler step; same numbers.
    @_one_call_at_a_time
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float | None = None,
        start_step: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        height: int | None = None,
        width: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> Img2ImgOutput:
        # 1. Check inputs.
        if clip_skip is not None:
            raise InvalidInputError(
                "clip skip is chosen when the model loads (the text encoder is cut, so its "
                "graphs and engines carry it): build the pipeline with "
                "from_pretrained(ModelSource(model, clip_skip=N)) and call it without clip_skip"
            )
        prompts, negative_prompts = call_texts(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            text_shape=self.text_shape,
            device=self.backend.device,
        )
        tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(
                f"output type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}"
            )
        plan = self.plan(
            image,
            self.scheduler,
            prompts=len(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            strength=strength,
            start_step=start_step,
            timesteps=timesteps,
            sigmas=sigmas,
            eta=eta,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
        )
        batch_size = plan.batch_size
        check_generator(generator, batch_size)
        self._interrupt = False
        # diffusers' pipe._guidance_scale: a step-end callback may change it.
        guidance_scale = self._guidance_scale = float(guidance_scale)
        do_guidance = self.do_classifier_free_guidance
        timings: dict[str, float] = {}

        # 2. Preprocess the image: resized, scaled to [-1, 1], NCHW; or latents as they are.
        inputs = plan.latents
        if inputs is None:
            inputs = self.image_processor.preprocess(
                plan.image, height=plan.height, width=plan.width
            )
        if inputs.shape[0] > batch_size or batch_size % inputs.shape[0]:
            raise InvalidInputError(
                f"{inputs.shape[0]} images for a batch of {batch_size} "
                "(prompts x images per prompt): give one image, or one per prompt"
            )
        inputs = inputs.to(self.backend.device, torch.float32)

        # 3. Encode the prompts; [uncond, cond] go through the UNet as ONE batch.
        with self._timed("text_encoder", timings):
            cond = self._encode(prompts)
            uncond = self._encode(negative_prompts) if do_guidance else None
            text_embeddings = text_batch(cond, uncond, plan.images_per_prompt)
        uncond_embeddings = None  # the negative half on its own, as diffusers gives callbacks
        if do_guidance and callback_on_step_end is not None:
            uncond_embeddings = text_embeddings.chunk(2)[0].clone()

        # 4. Timesteps: skip every index before the start step.
        scheduler = self.scheduler
        steps_left = start_timesteps(
            scheduler, plan.steps, plan.start_step, self.backend.device, plan.schedule
        )

        # 5. Encode the image, sample its latent with the caller's generator, add noise.
        # Latents given as the image are taken as diffusers takes them: no encoder, no draw.
        if plan.latents is None:
            with self._timed("vae_encoder", timings):
                encoded = self.backend.encode_image(inputs)
            vae_samples, scaling = self.dims.vae_samples, self.scaling_factor
        else:
            encoded, vae_samples, scaling = inputs, False, 1.0
        latents = noised_latents(
            encoded, vae_samples, scaling, batch_size, scheduler, steps_left[:1], generator
        )

        # 6. The loop: one UNet call per step on the 2B batch, then guidance and the step.
        # A step-end callback runs the eager loop: it sees and may change each step's tensors.
        # sdtrt's guidance cutoff is no callback there: its steps are tabulated in two runs.
        extra = step_kwargs(scheduler, generator, float(eta))
        unet_calls = self._num_timesteps = len(steps_left)
        guided_steps = tabulated_cutoff(callback_on_step_end, unet_calls, batch_size)
        table = None
        if not extra.get("eta") and (callback_on_step_end is None or guided_steps is not None):
            table = self._step_table(scheduler, steps_left, latents, generator)  # DDIM eta>0: no
        with self._timed("denoise", timings):
            if table is not None and self.step_graphs is not None:  # each step one CUDA graph
                latents = self.step_graphs.run(
                    table, latents, text_embeddings, guidance_scale, guided_steps
                )
                if guided_steps is not None and guided_steps < unet_calls and do_guidance:
                    self._guidance_scale = 0.0  # as the callback leaves it
            else:
                on_host = steps_left.cpu()  # the scheduler's (start_timesteps says why)
                bar = tqdm(on_host, disable=not self.show_progress, desc="denoising")
                for i, (t, t_host) in enumerate(zip(steps_left, bar, strict=True)):
                    if self._interrupt:  # diffusers' way to stop: the rest of the steps skipped
                        unet_calls -= 1
                        continue
                    model_input = unet_input(scheduler, latents, t_host, do_guidance)
                    noise_pred = self.backend.unet(model_input, t, text_embeddings)
                    latents = step(scheduler, noise_pred, t_host, latents, guidance_scale, extra)
                    if callback_on_step_end is not None:
                        latents, text_embeddings = self._step_end(
                            callback_on_step_end,
                            tensor_inputs,
                            (i, t),
                            latents,
                            text_embeddings,
                            uncond_embeddings,
                        )
                        # Guidance as the callback left it: off (a CFG cutoff), the cond rows.
                        guidance_scale = self._guidance_scale
                        do_guidance = self.do_classifier_free_guidance
        _check_finite(latents, "unet")

        # 7. Decode.
        if output_type == "latent":
            return Img2ImgOutput(_ordinary(latents), unet_calls, timings)
        with self._timed("vae_decoder", timings):
            decoded = self.backend.decode_latents(latents / self.scaling_factor)
        _check_finite(decoded, "vae_decoder")
        images = self.image_processor.postprocess(
            decoded, output_type=output_type, do_denormalize=[True] * decoded.shape[0]
        )
        if output_type == "pt":
            images = _ordinary(images)
        return Img2ImgOutput(images, unet_calls, timings)

    @property
    def guidance_scale(self) -> float:
        """diffusers' guidance scale of the call running (or last run): what it was given,
        or what a step-end callback set ``pipe._guidance_scale`` to, read after each callback."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' rule: guidance is on while the scale is above 1; off, the UNet runs on
        the prompts' rows alone (B, not 2B). diffusers' ``SDCFGCutoffCallback`` turns it off
        after a share of the steps, keeping the text batch's cond half."""
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """diffusers' count of the steps the loop runs (those after the start step)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """diffusers' flag: a step-end callback sets ``pipe._interrupt = True`` to skip the
        remaining steps (the latents so far are decoded)."""
        return self._interrupt

    def plan(
        self,
        image: Any,
        scheduler: Any,
        *,
        prompts: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 8.0,
        strength: float | None = None,
        start_step: int | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
    ) -> CallPlan:
        """A call's arguments other than its texts and generator, checked against the
        model, the backend's engines, ``scheduler`` (the one that will run: a custom
        schedule is checked by setting it) and this machine's limits, before any network
        runs: InvalidInputError names what is allowed. ``prompts``: how many the call has.
        The server checks each request here too (``serve/batcher.py``)."""
        check_steps_and_guidance(num_inference_steps, guidance_scale)
        config = self.model_scheduler_config
        schedule, steps = custom_schedule(scheduler, config, timesteps, sigmas)
        if not schedule:  # diffusers' rule: with a schedule the count is ignored
            steps = int(num_inference_steps)
        start = resolve_start_step(steps, strength, start_step)
        check_eta(eta)
        if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise InvalidInputError(
                f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}"
            )
        images = int(num_images_per_prompt)
        latents = latents_input(image, self.dims.latent_channels)
        if latents is None:
            image = image_input(image)
            height, width = self.output_size(image, height, width)
        else:
            image = None
            height, width = latents_size(
                latents,
                height,
                width,
                self.dims.vae_scale_factor,
                self.backend.size_multiple,
                self.backend.pixel_range,
            )
        self.limits.check(steps=steps, batch=prompts * images, height=height, width=width)
        if not schedule:  # a custom one was checked by the scheduler as it was set
            check_scheduler_fits(type(scheduler), scheduler.config, steps)
        return CallPlan(
            steps, start, schedule, images, prompts * images, height, width, image, latents
        )

    def output_size(self, image: Any, height: int | None, width: int | None) -> tuple[int, int]:
        """The size asked for (a multiple of the backend's unit), else diffusers' rule: the
        image's own size, rounded down to that unit, with a note when that resizes it. A
        size the backend's engines do not take is refused here, before any work."""
        return output_size(
            image, height, width, self.backend.size_multiple, self.backend.pixel_range
        )

    def _step_end(
        self,
        callback: Callable[..., Any],
        names: tuple[str, ...],
        step_at: tuple[int, torch.Tensor],
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        uncond_embeddings: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``callback_on_step_end(pipe, i, t, tensors)`` after step ``i`` at
        timestep ``t``, given the tensors it named; the latents and text batch it returns
        (or those it leaves out) for the next step."""
        given = {
            "latents": latents,
            "prompt_embeds": text_embeddings,
            "negative_prompt_embeds": uncond_embeddings,
        }
        changed = callback(self, *step_at, {name: given[name] for name in names})
        self._guidance_scale = guidance_left(self._guidance_scale)
        rows = len(latents) * (2 if self.do_classifier_free_guidance else 1)
        return step_end_outputs(changed, latents, text_embeddings, rows)

    def _step_table(
        self,
        scheduler: Any,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> StepTable | None:
        """The schedule as a table where the backend replays whole steps and the scheduler
        can be tabulated; None: the eager loop."""
        unet = self.backend.step_unet
        if unet is None:
            return None
        if self.step_graphs is None or self.step_graphs.unet is not unet:
            self.step_graphs = StepGraphs(unet)
        return tabulate(scheduler, timesteps, latents, generator)

    def _encode(self, texts: Texts) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            return texts  # given: no text encoder call
        return self.backend.encode_text(token_ids(self.tokenizer, texts))

    @contextmanager
    def _timed(self, stage: str, timings: dict[str, float]) -> Iterator[None]:
        # Also a named range in a profiler's trace (bench --profile reads "sdtrt.denoise"),
        # closed after the stopwatch's synchronisation: the range holds the stage's GPU work.
        with record_function(f"sdtrt.{stage}"), stopwatch(self.backend.synchronize) as watch:
            yield
        timings[stage] = watch.ms


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """Tensors made in inference mode cannot be changed in place outside it: the caller gets
    an ordinary one, as from diffusers' no_grad pipeline (pil and np outputs are not
    tensors)."""
    with torch.inference_mode(False):
        return tensor.clone()


def _options(backend: BackendOptions | str) -> BackendOptions:
    return default_options(backend) if isinstance(backend, str) else backend


# diffusers' from_pretrained keywords and how sdtrt says the same.
_DIFFUSERS_KEYWORDS = {
    "torch_dtype": "give backend=TorchOptions(dtype='fp16') (the graph backends: "
    "OrtOptions or TensorRTOptions(precision='fp16'))",
    "device_map": "give backend=TorchOptions(device='cuda')",
    "variant": "give model=ModelSource(folder, variant='fp16')",
    "clip_skip": "give model=ModelSource(model, clip_skip=N)",
    "local_files_only": "leave it out: sdtrt reads local folders only and downloads nothing",
    "use_safetensors": "leave it out: safetensors weights are read, a .ckpt only with "
    "ModelSource(file, allow_pickle=True)",
    "safety_checker": "leave it out: sdtrt runs no safety checker",
}


def _diffusers_keywords(given: dict[str, Any]) -> str:
    advice = [
        f"{name}: {_DIFFUSERS_KEYWORDS[name]}" for name in given if name in _DIFFUSERS_KEYWORDS
    ]
    others = sorted(set(given) - set(_DIFFUSERS_KEYWORDS))
    advice += [f"{', '.join(others)}: not sdtrt keywords"] * bool(others)
    return (
        "from_pretrained takes model, backend, scheduler, cache and show_progress (from sdtrt "
        "import ModelSource, TorchOptions, OrtOptions, TensorRTOptions); " + "; ".join(advice)
    )


def _check_finite(tensor: torch.Tensor, network: str) -> None:
    if not torch.isfinite(tensor).all():
        raise non_finite_error(network)


def non_finite_error(network: str) -> NonFiniteOutputError:
    """What a request whose ``network`` ("unet" or "vae_decoder") gave NaN or inf fails with."""
    if network == "unet":
        # Checked once, on the loop's last latents: the UNet's output or a scheduler's update
        # (some solver settings diverge on some models in diffusers too) made them.
        return NonFiniteOutputError(
            "the denoising loop produced NaN or infinite latents (the UNet's output or the "
            "scheduler's update); in fp16, try fp32 or another scheduler"
        )
    return NonFiniteOutputError(
        "the VAE decoder produced NaN or infinite values; with fp16 this is usually the VAE "
        "overflowing: export or build the VAE in fp32"
    )
