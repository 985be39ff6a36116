"""The AUTOMATIC1111 web UI's API (``/sdapi/v1``, also served by SD.Next and Forge) over the
step batcher: ``POST /sdapi/v1/img2img``, and what its clients read first (samplers,
schedulers, models, options, scripts), so that a client written for that API (the
``webuiapi`` package, editor plug-ins, bots) runs img2img on sdtrt.

Its fields as A1111 names them: ``init_images`` (one, base64), ``prompt``,
``negative_prompt``, ``denoising_strength``, ``steps``, ``cfg_scale``, ``sampler_name``
(with A1111's ``scheduler``), ``seed`` (-1: a new one), ``width``/``height`` (512 each
unless given), ``resize_mode`` (0-2: /v1's default, crop and fill), ``batch_size`` and
``n_iter``. As A1111 seeds a batch, image i has seed + i: each is its own job (they share
the UNet calls like any other requests) and can be made again alone from its seed. The
prompts' emphasis, ``(word:1.2)``, weighs their tokens as A1111 weighs them. The many
fields A1111's clients send at their defaults are taken at those defaults; one asking
for what sdtrt does not do (a mask, face restoration, tiling, scripts, another model...)
is refused (422), not ignored. The answer is A1111's: ``images`` (PNGs in base64),
``parameters`` (the request), ``info`` (a JSON string: seeds, sizes, the infotexts).
``POST /sdapi/v1/interrupt`` and ``/skip`` end the images being denoised where they are
(``Job.interrupt``); interrupt leaves the calls' images not started unmade, skip runs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.handling import (
    BadRequest,
    as_bad_request,
    decode_base64,
    decode_image,
    encoded,
    encoded_images,
    field_value,
    read_body,
    run_job,
    unauthorised,
)
from sdtrt.serve.jobs import Job, JobResult, ProgressHook
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.streaming import every_nth

# A1111's samplers sdtrt runs: name -> (aliases, sdtrt's scheduler on the sampler's own
# ("uniform") schedule, on Karras's sigmas; None: not here). A1111's "automatic" schedule is
# the sampler's default there: Karras's for the DPM++ samplers (2M SDE's is the exponential
# one, which sdtrt lacks: Karras's too), else its own.
SAMPLERS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "Euler a": (("k_euler_a", "k_euler_ancestral"), "euler_a", None),
    "Euler": (("k_euler",), "euler", None),
    "LMS": (("k_lms",), "lms", "lms_karras"),
    "DPM++ 2M": (("k_dpmpp_2m",), "dpmpp_2m", "dpmpp_2m_karras"),
    "DPM++ 2M SDE": (("k_dpmpp_2m_sde_ka",), None, "dpmpp_2m_sde_karras"),
    "DDIM": (("ddim",), "ddim", None),
    "PLMS": (("plms",), "pndm", None),
    "UniPC": (("unipc",), "unipc", None),
    "LCM": (("k_lcm",), "lcm", None),
}
# The names before A1111 1.9 split samplers from schedules.
_OLD_NAMES = {
    "LMS Karras": ("LMS", "karras"),
    "DPM++ 2M Karras": ("DPM++ 2M", "karras"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "karras"),
}
SCHEDULES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}

# A1111's fields that ask for nothing sdtrt lacks at these values (its clients send them
# all): the values taken; what is refused otherwise, and why.
_AT_DEFAULT: dict[str, tuple[tuple[Any, ...], str]] = {
    "mask": ((None, ""), "a mask asks for inpainting; this server runs img2img"),
    "restore_faces": ((False, None), "no face restoration here"),
    "tiling": ((False, None), "no tiling here"),
    "styles": (([], None), "no saved styles here: put them in the prompt"),
    "subseed_strength": ((0, 0.0, None), "no variation seeds here"),
    "seed_resize_from_h": ((0, -1, None), "no seed resizing here"),
    "seed_resize_from_w": ((0, -1, None), "no seed resizing here"),
    "initial_noise_multiplier": ((1, 1.0, None), "the noise is the scheduler's own"),
    "s_churn": ((0, 0.0, None), "k-diffusion's settings are not sdtrt's schedulers'"),
    "s_tmax": ((0, 0.0, None), "k-diffusion's settings are not sdtrt's schedulers'"),
    "s_tmin": ((0, 0.0, None), "k-diffusion's settings are not sdtrt's schedulers'"),
    "s_noise": ((1, 1.0, None), "k-diffusion's settings are not sdtrt's schedulers'"),
    "script_name": ((None, ""), "no scripts here"),
    "script_args": (([], None), "no scripts here"),
    "alwayson_scripts": (({}, None), "no scripts or extensions here"),
    "save_images": ((False, None), "this server keeps no files"),
}
# Sent by clients, meaningless here: A1111's inpainting settings (no mask is taken),
# InstructPix2Pix's image guidance, saving and task switches, the subseed (its strength is
# 0: unused), the settings' restoring (none is changed).
_IGNORED = ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
            "inpaint_full_res_padding", "inpainting_mask_invert", "image_cfg_scale",
            "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
            "subseed", "force_task_id", "infotext", "comments",
            "disable_extra_networks")  # fmt: skip
# What is read: A1111's names, and /v1's fields and types for its numbers.
_NUMBERS = (
    ("denoising_strength", "strength", float),
    ("steps", "num_inference_steps", int),
    ("cfg_scale", "guidance_scale", float),
)
_READ = ("init_images", "prompt", "negative_prompt", "width", "height", "denoising_strength",
         "steps", "cfg_scale", "sampler_name", "sampler_index", "scheduler", "seed",
         "batch_size", "n_iter", "eta", "override_settings", "send_images",
         "include_init_images", "resize_mode")  # fmt: skip
# A1111's resize modes: Just resize, Crop and resize, Resize and fill (diffusers' image
# processor's default, crop and fill); 3, a latent upscale, is not here.
_RESIZE_MODES = {0: "default", 1: "crop", 2: "fill"}
LIVE_PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps


def add_a1111_api(
    app: FastAPI,
    handled: Callable[..., Awaitable[Response]],
    batcher: StepBatcher,
    options: ServeOptions,
    intake: Executor,
) -> None:
    """A1111's ``/sdapi/v1`` routes on ``app``: img2img run as ``/v1/img2img`` runs a request
    (``handled``: the app's way of answering one, here with A1111's error object)."""
    from sdtrt import __version__

    model = options.model_name
    running: dict[CallProgress, None] = {}  # the calls in flight, oldest first
    # A1111's live previews, every 10 steps (its default), where a TAESD makes them cheap.
    live_previews = every_nth(LIVE_PREVIEW_EVERY) if options.preview_vae else None

    def listed(request: Request, answer: Any) -> Response:
        return unauthorised(request, options, error_object) or JSONResponse(answer)

    @app.get("/sdapi/v1/samplers")
    def samplers(request: Request) -> Response:
        return listed(request, [{"name": name, "aliases": list(aliases), "options": {}}
                                for name, (aliases, *_) in SAMPLERS.items()])  # fmt: skip

    @app.get("/sdapi/v1/schedulers")
    def schedulers(request: Request) -> Response:
        return listed(request, [{"name": name, "label": label, "aliases": None,
                                 "default_rho": -1, "need_inner_model": False}
                                for name, label in SCHEDULES.items()])  # fmt: skip

    @app.get("/sdapi/v1/sd-models")
    def models(request: Request) -> Response:
        return listed(request, [{"title": model, "model_name": model, "hash": None,
                                 "sha256": None, "filename": model, "config": None}])  # fmt: skip

    @app.get("/sdapi/v1/options")
    def settings(request: Request) -> Response:
        return listed(request, {"sd_model_checkpoint": model, "sd_checkpoint_hash": None})

    @app.post("/sdapi/v1/options")
    async def set_settings(request: Request) -> Response:
        """A1111's clients choose the model this way: this server's is taken (nothing to do),
        any other setting refused."""
        if failure := unauthorised(request, options, error_object):
            return failure
        try:
            given = json.loads(await read_body(request, options))
        except ValueError as exc:
            return error_object(BadRequest(400, f"the body is not JSON: {exc}"), "")
        except BadRequest as exc:  # over the body limit
            return error_object(exc, "")
        if given != {"sd_model_checkpoint": model}:
            return error_object(
                BadRequest(422, f"this server sets nothing but sd_model_checkpoint {model!r} "
                                f"(its one model), got {given!r}"), "")  # fmt: skip
        return JSONResponse(None)

    @app.get("/sdapi/v1/scripts")
    def scripts(request: Request) -> Response:
        return listed(request, {"txt2img": [], "img2img": []})

    @app.get("/sdapi/v1/progress")
    def progress(request: Request, skip_current_image: bool = False) -> Response:
        """The oldest img2img call in flight (A1111 runs one at a time; its clients poll
        this while theirs runs): the share of its steps done, the seconds it has left at
        that pace, the steps of its first image, its latest live preview (with
        --preview-vae: A1111's every 10 steps) unless skip_current_image."""
        calls = list(running)
        oldest = calls[0] if calls else CallProgress(0)
        return listed(request, oldest.answer(len(calls), not skip_current_image))

    @app.post("/sdapi/v1/interrupt")
    def interrupt(request: Request) -> Response:
        """A1111's Interrupt: the calls in flight finish now, each image with the steps it
        has taken (decoded as they are), an image not started with none."""
        for call in running:
            call.interrupt()
        return listed(request, {})

    @app.post("/sdapi/v1/skip")
    def skip(request: Request) -> Response:
        """A1111's Skip: the images being denoised now finish with the steps they have
        taken; the calls' images not started yet run (A1111's next batch)."""
        for call in running:
            call.skip()
        return listed(request, None)

    @app.post("/sdapi/v1/img2img", response_class=Response)
    async def img2img(request: Request) -> Response:
        async def serve(request_id: str) -> tuple[JobResult, Callable[[JobResult], Response]]:
            try:
                given = json.loads(await read_body(request, options))
            except ValueError as exc:
                raise BadRequest(400, f"the body is not JSON: {exc}") from None
            call = read_call(given, model, batcher.request_defaults, batcher.max_queue)
            told = CallProgress(len(call.seeds))
            running[told] = None
            try:
                results = await _run_all(
                    request, request_id, batcher, intake, call, told, live_previews
                )
            finally:
                del running[told]
            done = merged(results)
            return done, lambda _: _answer(results, call, given, model, __version__)

        return await handled(request, serve, error_object)


class CallProgress:
    """An img2img call's progress as A1111's ``/progress`` answers it: the steps done and
    to do of each of its images, and the latest preview of any, told by the worker
    (``hook(i)``: image i's hook); and its jobs, for A1111's interrupt and skip."""

    def __init__(self, images: int) -> None:
        self.started = time.monotonic()
        self.steps = [(0, 0)] * images  # (done, steps) per image
        self.preview: Any = None  # a picture
        self.jobs: list[Job] = []
        self.interrupted = self.skipped = False

    def keep(self, job: Job) -> None:
        """``job`` is one of the call's (an interrupted call's is interrupted)."""
        self.jobs.append(job)
        if self.interrupted:
            job.interrupt()

    def interrupt(self) -> None:
        self.interrupted = True
        for job in self.jobs:
            job.interrupt()

    def skip(self) -> None:
        """The jobs admitted by now finish with the steps they have taken."""
        self.skipped = True
        for job in self.jobs:
            if job.admitted:
                job.interrupt()

    def hook(self, image: int) -> ProgressHook:
        def told(done: int, steps: int | None, previews: Any = None) -> None:
            if steps is not None:
                self.steps[image] = (done, steps)
            if previews:
                self.preview = previews[0]

        return told

    def answer(self, calls: int, with_image: bool = True) -> dict[str, Any]:
        """A1111's answer; ``with_image``: the latest preview as ``current_image`` (a PNG in
        base64), where there is one."""
        image = None
        if with_image and self.preview is not None:
            image = base64.b64encode(encoded_images([self.preview], "png")[0]).decode()
        done = sum(d for d, _ in self.steps)
        total = sum(s for _, s in self.steps)
        share = done / total if total else 0.0
        elapsed = time.monotonic() - self.started
        first = self.steps[0] if self.steps else (0, 0)
        return {
            "progress": share,
            "eta_relative": elapsed / share - elapsed if share else 0.0,
            "state": {
                "skipped": self.skipped,
                "interrupted": self.interrupted,
                "job": "img2img" if calls else "",
                "job_count": calls,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "job_no": 0,
                "sampling_step": first[0],
                "sampling_steps": first[1],
            },
            "current_image": image,
            "textinfo": None,
        }


class Call:
    """An A1111 img2img call as sdtrt's jobs: the image's bytes, /v1's values shared by its
    images, and each image's seed."""

    def __init__(self, image: bytes, values: dict[str, Any], seeds: list[int], sampler: str):
        self.image, self.values, self.seeds, self.sampler = image, values, seeds, sampler


def read_call(given: Any, model: str, defaults: dict[str, Any], max_images: int) -> Call:
    """A1111's img2img body as a ``Call``, the server's ``defaults`` (its request defaults)
    for what it leaves out but the size (A1111's 512x512); BadRequest (422, A1111's status
    for a bad field) naming what is allowed; at most ``max_images`` images."""
    if not isinstance(given, dict):
        raise BadRequest(422, "the body must be a JSON object of A1111's img2img fields")
    form = dict(given)
    images = form.pop("init_images", None)
    if not isinstance(images, list) or len(images) != 1:
        count = len(images) if isinstance(images, list) else 0
        raise BadRequest(422, f"init_images: send one image (base64), got {count}")
    for name, (allowed, why) in _AT_DEFAULT.items():
        value = form.pop(name, allowed[0])
        if value not in allowed:
            raise BadRequest(422, f"{name} {value!r}: {why} (taken: {allowed[0]!r})")
    overrides = form.pop("override_settings", None) or {}
    if not isinstance(overrides, dict) or set(overrides) - {"sd_model_checkpoint"}:
        raise BadRequest(422, "override_settings: only sd_model_checkpoint is taken (the "
                              f"server's model), got {overrides!r}")  # fmt: skip
    wanted = overrides.get("sd_model_checkpoint", model)
    if wanted != model:
        raise BadRequest(422, f"sd_model_checkpoint {wanted!r}: this server has {model!r}")
    unknown = sorted(set(form) - {*_IGNORED, *_READ})
    if unknown:
        raise BadRequest(
            422, f"unknown field(s) {', '.join(unknown)}; taken: {', '.join(_READ)}, and "
            "A1111's others at their defaults"
        )  # fmt: skip
    values: dict[str, Any] = {
        "prompt": _text(form, "prompt"),
        "negative_prompt": _text(form, "negative_prompt"),
        "width": field_value(form.get("width", 512), int, "width"),
        "height": field_value(form.get("height", 512), int, "height"),
        "emphasis": True,  # A1111's (word:1.2)
        "scheduler": defaults["scheduler"],
        "num_inference_steps": defaults["num_inference_steps"],
        "guidance_scale": defaults["guidance_scale"],
        "strength": defaults["strength"],
    }
    for theirs, ours, kind in _NUMBERS:
        if form.get(theirs) is not None:
            values[ours] = field_value(form[theirs], kind, theirs)
    sampler = form.get("sampler_name") or form.get("sampler_index")
    if sampler is not None:
        values["scheduler"] = scheduler_for(str(sampler), str(form.get("scheduler") or "automatic"))
    if form.get("eta") is not None:  # DDIM's and TCD's; the others take none, as diffusers'
        values["eta"] = field_value(form["eta"], float, "eta")
    resize_mode = form.get("resize_mode", 0)
    if resize_mode not in _RESIZE_MODES or isinstance(resize_mode, bool):
        raise BadRequest(
            422, f"resize_mode {resize_mode!r}: taken: 0 (Just resize), 1 (Crop and resize), "
            "2 (Resize and fill)"
        )  # fmt: skip
    values["resize_mode"] = _RESIZE_MODES[resize_mode]
    batch_size = field_value(form.get("batch_size", 1), int, "batch_size")
    n_iter = field_value(form.get("n_iter", 1), int, "n_iter")
    if not (batch_size >= 1 and n_iter >= 1 and batch_size * n_iter <= max_images):
        raise BadRequest(
            422, f"batch_size and n_iter must be >= 1, their product at most {max_images} (the "
            f"server's queue); got {batch_size} and {n_iter}"
        )  # fmt: skip
    seed = field_value(form.get("seed", -1), int, "seed")
    if seed == -1:  # A1111's "random"
        seed = secrets.randbelow(2**32 - batch_size * n_iter)
    seeds = [seed + i for i in range(batch_size * n_iter)]
    return Call(decode_base64(images[0]), values, seeds, str(sampler or values["scheduler"]))


def scheduler_for(sampler: str, schedule: str) -> str:
    """sdtrt's scheduler for A1111's sampler (its name, an alias, or an old name with its
    schedule in it) and schedule (automatic, uniform, karras); sdtrt's own names pass."""
    from sdtrt.runtime.schedulers import SCHEDULERS as OURS

    if sampler in OURS:
        return sampler
    name, schedule = _OLD_NAMES.get(sampler, (sampler, schedule.lower()))
    if schedule not in SCHEDULES:
        raise BadRequest(422, f"scheduler {schedule!r}: taken: {', '.join(SCHEDULES)}")
    for known, (aliases, plain, karras) in SAMPLERS.items():
        if name == known or name in aliases:
            if schedule == "automatic":
                schedule = "karras" if known.startswith("DPM++") else "uniform"
            ours = karras if schedule == "karras" else plain
            if ours is None:
                raise BadRequest(422, f"sampler {known!r} on the {schedule} schedule is not "
                                      "sdtrt's: take automatic")  # fmt: skip
            return ours
    names = [*SAMPLERS, *_OLD_NAMES]
    raise BadRequest(422, f"sampler {sampler!r} is not here; taken: {', '.join(names)}")


def _text(form: dict[str, Any], name: str) -> str:
    """A prompt, refused where it calls for one of A1111's extra networks (``<lora:NAME:W>``,
    ``<hypernet:...>``): sdtrt has none to switch per request (a server's LoRAs are fused as
    it starts: ``--lora``). Its emphasis, ``(word:1.2)``, is read as A1111 reads it
    (runtime/emphasis.py)."""
    value = form.get(name) or ""
    if not isinstance(value, str):
        raise BadRequest(422, f"{name} must be a string")
    if tag := _EXTRA_NETWORK.search(value):
        raise BadRequest(
            422, f"{name} calls for {tag.group(0)}: this server switches no extra networks per "
            "request (its LoRAs are fused as it starts: sdtrt serve --lora FILE:SCALE)"
        )  # fmt: skip
    return value


_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


async def _run_all(
    request: Request,
    request_id: str,
    batcher: StepBatcher,
    intake: Executor,
    call: Call,
    progress: CallProgress,
    previews: Callable[[int], frozenset[int]] | None,
) -> list[JobResult]:
    """One job per image (its own seed), run side by side, each telling ``progress`` (with
    previews after the steps ``previews`` gives); the first failure cancels the rest and is
    the call's."""
    loaded: list[Any] = []

    def load() -> Any:  # in the intake thread: decoded once, for every image
        if not loaded:
            loaded.append(decode_image(call.image))
        return loaded[0]

    tasks = [
        asyncio.ensure_future(
            run_job(
                request.is_disconnected,
                request_id,
                batcher,
                intake,
                {**call.values, "seed": seed},
                load,
                before_queue=progress.keep,
                progress=progress.hook(i),
                previews=previews,
            )
        )
        for i, seed in enumerate(call.seeds)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()  # those still running: their jobs are cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def merged(results: list[JobResult]) -> JobResult:
    """One result for the call's jobs (what /metrics counts): their images in order, their
    UNet calls, the longest queue wait and per-stage time."""
    timings: dict[str, float] = {}
    for result in results:
        for stage, ms in result.timings_ms.items():
            timings[stage] = max(timings.get(stage, 0.0), ms)
    return JobResult(
        images=[image for result in results for image in result.images],
        arrays=[array for result in results for array in result.arrays],
        seed=results[0].seed,
        unet_calls=sum(result.unet_calls for result in results),
        queue_wait_ms=max(result.queue_wait_ms for result in results),
        timings_ms=timings,
    )


def _answer(
    results: list[JobResult], call: Call, given: dict[str, Any], model: str, version: str
) -> Response:
    """A1111's answer: the images as PNGs in base64 (an interrupted call's those it made),
    the request as given (its images left out, as A1111 leaves them out), and ``info``, a
    JSON string."""
    images = [base64.b64encode(png).decode() for r in results for png in encoded(r, "png")]
    made = [result for result in results if result.images]
    values, count = call.values, len(call.seeds)
    width, height = made[0].image.size if made else (values["width"], values["height"])
    prompt, negative = values["prompt"], values["negative_prompt"]

    def infotext(seed: int) -> str:  # A1111's: the prompts, then the settings
        return (
            f"{prompt}\nNegative prompt: {negative}\nSteps: {values['num_inference_steps']}, "
            f"Sampler: {call.sampler}, CFG scale: {values['guidance_scale']}, Seed: {seed}, "
            f"Size: {width}x{height}, Model: {model}, Denoising strength: "
            f"{values['strength']}, Version: sdtrt {version}"
        )

    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": call.seeds[0],
        "all_seeds": call.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": call.sampler,
        "cfg_scale": values["guidance_scale"],
        "steps": values["num_inference_steps"],
        "batch_size": given.get("batch_size", 1),
        "denoising_strength": values["strength"],
        "sd_model_name": model,
        "index_of_first_image": 0,
        "infotexts": [infotext(result.seed) for result in made],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "version": f"sdtrt {version}",
    }
    # A1111 echoes the request, its images only with include_init_images.
    parameters = {**given, "mask": None}
    if not given.get("include_init_images"):
        parameters["init_images"] = None
    if given.get("send_images", True) is False:
        images = []
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})


def error_object(exc: BaseException, request_id: str) -> JSONResponse:
    """A failure as A1111's API answers one: ``{"error", "detail", "body", "errors"}`` with
    its status."""
    failure = as_bad_request(exc, request_id)
    body = {"error": type(exc).__name__, "detail": failure.message, "body": "",
            "errors": failure.message}  # fmt: skip
    return JSONResponse(body, failure.status, headers=failure.headers)
