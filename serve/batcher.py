"""Step-level (continuous) batching of img2img requests over the backend interface.

Each admitted request is a job with its own scheduler, generator, guidance scale, start step
and number of steps. Every iteration of the worker makes ONE UNet call for the active jobs
of one latent size: their rows concatenated, each row at its own timestep; then each job
applies its guidance and its own ``scheduler.step``. New requests join at the next
iteration, finished ones leave and are decoded together. Size groups are served in turn.
The worker does not wait for the device between steps: it queues at most ``RUN_AHEAD``
steps ahead of the GPU, reads what a step left on the host (its rows' finiteness flags, its
previews' pixels) once the device has passed that step (a job whose UNet output went NaN
or infinite fails then, after its next step, and gives its rows up), and reads results
(images, stage times) only when jobs finish. On a CPU, where calls are synchronous,
nothing is left queued between iterations; it runs PyTorch with its own intra-op thread
count (1 by default: ``ServeOptions.intra_op_threads`` says why).

Two reference policies run through the same machinery, for the load benchmark: ``request``
(wait up to a queue delay for requests with identical parameters, run them as one batch
to the end: what Triton and PyTriton do) and ``single`` (one request at a time).
No HTTP here: ``serve/app.py`` puts this behind FastAPI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import PIL.Image
import torch

from sdtrt.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NonFiniteOutputError,
    RequestCancelledError,
    ServerBusyError,
)
from sdtrt.runtime.clock import mark, wait
from sdtrt.runtime.emphasis import emphasised, weighted_ids
from sdtrt.runtime.guidance import guided_steps
from sdtrt.runtime.pipeline import Img2ImgPipeline, non_finite_error
from sdtrt.runtime.schedulers import step_kwargs
from sdtrt.runtime.steps import (
    noised_latents,
    start_timesteps,
    step,
    step_and_estimate,
    text_batch,
    token_ids,
    unet_input,
)
from sdtrt.serve import warmup
from sdtrt.serve.admission import admit, priority_level
from sdtrt.serve.intake import checked_job
from sdtrt.serve.jobs import Img2ImgRequest, Job, JobResult
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.previews import PreviewDecoder, pictures

logger = logging.getLogger(__name__)

# Steps the worker may have queued on the device beyond the one running: enough for the
# host's work on the next step (inputs, launches, scheduler updates) to overlap the GPU's
# work on this one, few enough that a cancelled or late job stops within a step or two.
RUN_AHEAD = 2


@dataclass
class BatcherStats:
    """What /metrics reports: a plain counter, read without the lock, and the observers of
    each UNet call's rows (the rows-per-call histogram)."""

    unet_calls: int = 0
    on_unet_call: list[Callable[[int], None]] = field(default_factory=list)


class StepBatcher:
    """Runs jobs on one backend from one worker thread. ``submit`` is thread-safe."""

    def __init__(
        self, pipeline: Img2ImgPipeline, options: ServeOptions = ServeOptions(), start: bool = True
    ) -> None:
        """``start=False``: the worker waits for ``start()`` (tests queue a whole load
        first, so what is batched with what does not depend on thread timing)."""
        self.pipeline = pipeline
        self.backend = pipeline.backend
        self.policy = options.policy
        limit = self.backend.max_unet_rows  # a TensorRT profile's bound
        self.max_rows = options.max_rows or limit or 16
        if limit is not None and self.max_rows > limit:
            raise InvalidInputError(
                f"max rows {self.max_rows} is over the UNet engine's profile ({limit} rows)"
            )
        # Prompts and images per text encoder or VAE call: new jobs are encoded, and finished
        # ones decoded, in chunks of this many (a TensorRT profile can take fewer images than
        # UNet rows: unguided jobs take one row each, and sizes share one text batch).
        self.max_images = self.backend.max_image_rows
        self.request_defaults: dict[str, Any] = {
            "scheduler": pipeline.scheduler_name or "lms",
            "num_inference_steps": options.steps,
            "guidance_scale": options.guidance,
            "strength": options.strength,
            "guidance_cutoff": options.guidance_cutoff,
        }
        """What an HTTP request that leaves a field out gets: the scheduler the pipeline
        was built with (``sdtrt serve --scheduler``), the options' steps, guidance, guidance
        cutoff and strength (the last only where the request sends no start_step either)."""
        self.max_queue, self.queue_delay = options.max_queue, options.queue_delay
        self.intra_op_threads = options.intra_op_threads
        self.timeout = options.timeout
        self.priority_levels = options.priority_levels
        self.per_row_timesteps = self.backend.per_row_timesteps
        self.device = self.backend.device
        decode = partial(self._in_chunks, self.backend.decode_latents)
        self.previews = PreviewDecoder(pipeline, options.preview_vae, decode)
        # A blank picture per warm-up size, prepared as a request is (refused here, at
        # start, when the model cannot take the size).
        self._warmup_jobs = [
            self.prepare(Img2ImgRequest(image=PIL.Image.new("RGB", (w, h)), height=h, width=w))
            for h, w in options.warmup_sizes
        ]
        self.warmed: Future[int] = Future()
        """The number of shapes the worker has run at the warm-up sizes, or why it failed."""
        self._queued: deque[_Queued] = deque()  # the steps queued on the device
        # The steps left queued between iterations: with the next one, RUN_AHEAD on a GPU.
        self._ahead = RUN_AHEAD - 1 if self.device.type == "cuda" else 0
        self.stats = BatcherStats()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.draining = False
        self._turn = 0
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sdtrt-batcher", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------

    def request(self, **fields: Any) -> Img2ImgRequest:
        """A request of ``fields``, the server's defaults for the ones left out (strength's
        only where there is no start_step: the same knob, a request names one of the two)."""
        defaults = dict(self.request_defaults)
        if "start_step" in fields:
            defaults.pop("strength")
        return Img2ImgRequest(**{**defaults, **fields})

    def prepare(
        self, request: Img2ImgRequest, timeout: float | None = None, priority: int = 0
    ) -> Job:
        """Check a request whole and preprocess its image (InvalidInputError naming what
        is allowed), before it takes a place in the queue (serve/intake.py). ``priority``:
        Triton's, 1 the highest level, 0 the server's default (its lowest)."""
        level = priority_level(priority, self.priority_levels)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        return checked_job(self.pipeline, request, self.max_rows, deadline, level)

    def submit(self, job: Job) -> Future[JobResult]:
        with self._lock:
            if self._stopped:
                raise ServerBusyError("the server has stopped: it takes no new requests")
            if self.draining:
                raise ServerBusyError("the server is draining: it takes no new requests")
            if len(self.waiting) >= self.max_queue:
                raise ServerBusyError(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(job)
            self._lock.notify()
        return job.future

    def drain(self) -> None:
        """Take nothing new; what is queued or running finishes."""
        with self._lock:
            self.draining = True

    @property
    def stopped(self) -> bool:
        """The worker has stopped, or was told to: nothing new is taken."""
        return self._stopped

    @property
    def alive(self) -> bool:
        """The worker thread runs (a health check's question)."""
        return self._thread.is_alive() and not self._stopped

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        threads = self.intra_op_threads if self.device.type == "cpu" else None
        # The pipeline's one-call lock around the warm-up and each iteration: the backend's
        # buffers are the pipeline's too (a direct call waits for a step, not into it).
        one_call = self.pipeline.one_call
        with intra_op_threads(threads), torch.inference_mode():
            with one_call:
                self._warm_shapes()
            while True:
                with self._lock:
                    while not self._stopped and not self.waiting and not self.active:
                        self._lock.wait()
                    if self._stopped:
                        break
                    new = self._admit()
                try:
                    with one_call:
                        self._iterate(new)
                except Exception as exc:  # one bad iteration fails its jobs, not the worker
                    logger.exception("batcher iteration failed")
                    for job in [*new, *self.active]:
                        self._fail(job, exc)
                    self.active = []
                    self._stop_if_the_device_fails()
        for job in [*self.waiting, *self.active]:
            self._fail(job, ServerBusyError("the server stopped before the request finished"))

    def _stop_if_the_device_fails(self) -> None:
        """After a failed iteration: stop the worker where the device fails to synchronise
        (a CUDA error that sticks, an illegal address or a device-side assert, fails every
        later call in the process). New requests then get 503, and the liveness checks
        (/health, /v2/health/live, gRPC's health, Ray's) fail, so that an orchestrator
        restarts the server rather than leave it failing every request."""
        try:
            self.backend.synchronize()
        except Exception:
            logger.exception("the device fails after a failed iteration: the worker stops")
            with self._lock:
                self._stopped = True
            return
        self._queued.clear()  # the device is through them; their jobs have failed

    def _warm_shapes(self) -> None:
        """Every shape the worker can form at the warm-up sizes, run once
        (``ServeOptions.warmup_sizes`` says which and why), with the dtypes, devices and
        layouts of the worker's own calls: its own ``prepare`` and ``_noise`` make them."""
        start = time.perf_counter()
        try:
            shapes = self._run_warmup_shapes() if self._warmup_jobs else 0
        except Exception as exc:
            logger.exception("warming up the shapes failed")
            self.warmed.set_exception(exc)
            return
        if shapes:
            sizes = ", ".join(f"{h}x{w}" for h, w in (job.size for job in self._warmup_jobs))
            seconds = time.perf_counter() - start
            logger.info("warmed up %d shapes at %s in %.1f s", shapes, sizes, seconds)
        self.warmed.set_result(shapes)

    def _run_warmup_shapes(self) -> int:
        return warmup.run_shapes(
            self.backend,
            self.pipeline.tokenizer,
            self._warmup_jobs,
            max_rows=self.max_rows,
            max_images=self.max_images,
            noise=self._noise,
        )

    def _iterate(self, new: list[Job]) -> None:
        self._drop_expired()
        if new:
            self._each_alone_on_failure(self._start, new)
        group = self._next_group()
        if group:
            self._unet_step(group)
        self._settle(self._ahead)
        finished = [job for job in self.active if job.done]
        if finished:  # (an interrupt may come meanwhile: the finished ones are these)
            self.active = [job for job in self.active if job not in finished]
            self._each_alone_on_failure(self._finish, finished)
        if not self.active:
            self._settle(0)  # the device is through (decoding synchronised): let go of jobs
        if not new and not group and self.waiting:
            time.sleep(0.002)  # request-level batching waiting out its queue delay

    def _each_alone_on_failure(
        self,
        work: Callable[[list[Job]], None],
        jobs: list[Job],
        pending: Callable[[Job], bool] = lambda job: not job.future.done(),
    ) -> None:
        """``work(jobs)`` batched (encoding new jobs, a UNet step, decoding finished ones);
        where it fails (a bad input, memory run out at that batch), again job by job for the
        jobs it left ``pending``, so that only a job that fails alone fails. A job done with
        the work before the failure is not run again: a UNet step again would take its next
        step, or one past its last."""
        try:
            work(jobs)
        except Exception as exc:
            rest = [job for job in jobs if pending(job)]
            if len(rest) == 1:
                self._fail_active(rest[0], exc)
                return
            logger.warning(
                "a batch of %d jobs failed (%s): running %d alone", len(jobs), exc, len(rest)
            )
            for job in rest:
                self._each_alone_on_failure(work, [job], pending)

    def _admit(self) -> list[Job]:
        """Move waiting jobs to active as the policy allows (under the lock), once those
        that leave without running (``_leave``) are out: none is encoded for nothing."""
        now = time.monotonic()
        self._leave(self.waiting, now)
        args = (self.waiting, self.active, self.max_rows, self.queue_delay, now)
        admitted = admit(self.policy, *args)
        for job in admitted:
            self.waiting.remove(job)
            job.admitted = now
        return admitted

    def _drop_expired(self) -> None:
        with self._lock:
            self._leave(self.active, time.monotonic())

    def _leave(self, queue: Any, now: float) -> None:
        """Take out of ``queue`` (under the lock) the jobs that end before another step:
        cancelled, past their deadline (each failed as such), or interrupted before their
        first step (answered with no images)."""
        for job in list(queue):
            if job.cancelled:
                self._fail(job, RequestCancelledError("the client went away"))
            elif now > job.deadline:
                self._fail(job, DeadlineExceededError("the request passed its deadline"))
            elif job.interrupted and not job.index:
                _answer_unmade(job)
            else:
                continue
            queue.remove(job)

    def _start(self, jobs: list[Job]) -> None:
        """Text and VAE encoding of newly admitted jobs, batched; then each job's noised
        latents from its own generator (diffusers' draws, in diffusers' order)."""
        backend = self.backend
        guided = [job for job in jobs if job.guided]
        start = mark(self.device)
        cond = self._encode_texts([(p, job.request.emphasis) for job in jobs for p in job.prompts])
        uncond = None
        if guided:
            negatives = [(p, job.request.emphasis) for job in guided for p in job.negative_prompts]
            uncond = self._encode_texts(negatives)
        self._charge(jobs, "text_encoder", start)
        at, uncond_at = 0, 0
        for job in jobs:  # each job's prompts in turn, the guided ones' negatives too
            count, negative = len(job.prompts), None
            if job.guided and uncond is not None:
                negative = uncond[uncond_at : uncond_at + count]
                uncond_at += count
            n = job.request.num_images_per_prompt
            job.embeddings = text_batch(cond[at : at + count], negative, n)
            at += count
        for size_jobs in _by_size(jobs).values():
            start = mark(self.device)
            pixels = torch.cat([j.pixels for j in size_jobs]).to(backend.device)
            encoded = self._in_chunks(backend.encode_image, pixels)
            self._charge(size_jobs, "vae_encoder", start)
            for i, job in enumerate(size_jobs):
                self._noise(job, encoded[i : i + 1])
        self.active.extend(jobs)

    def _encode_texts(self, texts: list[tuple[str, bool]]) -> torch.Tensor:
        """The text encoder's output for (prompt, with A1111's emphasis) pairs, in chunks;
        the emphasised ones weighted (runtime/emphasis.py)."""
        tokenizer = self.pipeline.tokenizer
        rows = [i for i, (_, emphasis) in enumerate(texts) if emphasis]
        if not rows:
            return self._in_chunks(
                self.backend.encode_text, token_ids(tokenizer, [t for t, _ in texts])
            )
        # Each text tokenized once, as it is read (the markup's length is not the text's).
        weighted, weights = weighted_ids(tokenizer, [texts[i][0] for i in rows])
        plain = [i for i, (_, emphasis) in enumerate(texts) if not emphasis]
        ids = torch.empty((len(texts), weighted.shape[1]), dtype=weighted.dtype)
        ids[rows] = weighted
        if plain:
            ids[plain] = token_ids(tokenizer, [texts[i][0] for i in plain])
        hidden = self._in_chunks(self.backend.encode_text, ids)
        hidden[rows] = emphasised(hidden[rows], weights)
        return hidden

    def _in_chunks(
        self, call: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
    ) -> torch.Tensor:
        """``call`` on at most ``max_images`` rows of ``batch`` at a time, answers joined."""
        size = self.max_images or len(batch)
        if len(batch) <= size:
            return call(batch)
        return torch.cat([call(batch[i : i + size]) for i in range(0, len(batch), size)])

    def _noise(self, job: Job, encoded: torch.Tensor) -> None:
        r = job.request
        job.generator = torch.Generator().manual_seed(r.seed)
        job.extra = step_kwargs(job.scheduler, job.generator, float(r.eta))
        job.timesteps = start_timesteps(
            job.scheduler, r.num_inference_steps, job.t_start, self.backend.device, job.schedule
        )
        job.host_timesteps = job.timesteps.cpu()
        job.guided_steps = guided_steps(len(job.timesteps), r.guidance_cutoff)
        pipe = self.pipeline
        job.latents = noised_latents(
            encoded,
            pipe.dims.vae_samples,
            pipe.scaling_factor,
            job.images,
            job.scheduler,
            job.timesteps[:1],
            job.generator,
        )

    def _next_group(self) -> list[Job]:
        """The jobs of the next size group in turn (and of one timestep, where the UNet
        graph takes one for all rows), at most ``max_rows`` rows."""
        groups: dict[Any, list[Job]] = {}
        for job in [job for job in self.active if not job.done]:  # interrupted: no more steps
            key: Any = job.size
            if not self.per_row_timesteps:
                key = (job.size, float(job.host_timesteps[job.index]))
            groups.setdefault(key, []).append(job)
        if not groups:
            return []
        keys = sorted(groups, key=str)
        self._turn = (self._turn + 1) % len(keys)
        group, rows = [], 0
        for job in groups[keys[self._turn]]:
            if rows + job.rows <= self.max_rows:
                group.append(job)
                rows += job.rows
        return group

    def _unet_step(self, jobs: list[Job]) -> None:
        """One UNet call and scheduler update for ``jobs``; a job the update reached has
        taken its step."""
        before = {id(job): job.index for job in jobs}
        self._each_alone_on_failure(
            self._unet_call, jobs, pending=lambda job: job.index == before[id(job)]
        )
        previewed = [job for job in jobs if job.estimate is not None]
        if previewed:
            self._each_alone_on_failure(self._preview, previewed)

    def _settle(self, ahead: int) -> None:
        """Wait for the device to pass all but the last ``ahead`` queued steps, and read
        what they left on the host: a job whose UNet rows went NaN or infinite fails now
        instead of at its end (its later steps could only carry the NaN on) and leaves the
        active jobs; the others' previews go to their progress hooks as pictures."""
        while len(self._queued) > ahead:
            queued = self._queued.popleft()
            wait(queued.end)
            finite = queued.finite.tolist()
            for job, rows in queued.rows:
                if not all(finite[rows]) and not job.future.done():
                    self._fail_active(job, non_finite_error("unet"))
            for job, done, pixels in queued.previews:
                if job.progress is not None and not job.future.done():
                    self._tell(job, done, pictures(pixels))

    def _unet_call(self, jobs: list[Job]) -> None:
        if len(self._queued) >= RUN_AHEAD:  # a retry job by job: still RUN_AHEAD at most
            wait(self._queued[-RUN_AHEAD].end)
        start = mark(self.device)
        inputs, steps, hidden = [], [], []
        for job in jobs:
            t = job.host_timesteps[job.index]
            inputs.append(unet_input(job.scheduler, job.latents, t, job.guided))
            steps.append(job.timesteps[job.index].reshape(1).float().expand(job.rows))
            hidden.append(job.embeddings)
        noise_pred = self.backend.unet(torch.cat(inputs), torch.cat(steps), torch.cat(hidden))
        rows = noise_pred.shape[0]
        self.stats.unet_calls += 1
        for observe in self.stats.on_unet_call:
            observe(rows)
        # Each row's finiteness, copied to the host without waiting (read by _settle).
        finite = torch.isfinite(noise_pred).flatten(1).all(1).to("cpu", non_blocking=True)
        offset, job_rows = 0, []
        for job in jobs:
            pred = noise_pred[offset : offset + job.rows]
            job_rows.append((job, slice(offset, offset + job.rows)))
            offset += job.rows
            t = job.host_timesteps[job.index]
            args = (job.scheduler, pred, t, job.latents, job.request.guidance_scale, job.extra)
            if job.index + 1 in job.preview_steps:  # run_job sets them with a progress hook
                job.latents, job.estimate = step_and_estimate(*args)
            else:
                job.latents = step(*args)
            job.index += 1
            self._tell(job, job.index)  # queued for the device, not yet run on it
            if job.rows < len(job.embeddings):  # past its guidance cutoff: the cond rows
                job.embeddings = job.embeddings.chunk(2)[1]
        self._queued.append(_Queued(self._charge(jobs, "denoise", start), finite, job_rows))

    def _preview(self, jobs: list[Job]) -> None:
        """The jobs' estimates of their finished latents decoded, as their progress's
        previews: 8-bit pixels (``PreviewDecoder``), copied to the host without waiting and
        handed on by ``_settle`` once the device is through them."""
        start = mark(self.device)
        estimates = torch.cat([job.estimate for job in jobs if job.estimate is not None])
        pixels = self.previews.pixels(estimates)
        self._charge(jobs, "preview", start)
        on_host = pixels.to("cpu", non_blocking=True)
        end = mark(self.device)  # the step is through once its previews are copied
        if not self._queued:  # its UNet call failed for another job before it was queued
            self._queued.append(_Queued(end, torch.ones(0, dtype=torch.bool), []))
        queued = self._queued[-1]  # this step's, else the last queued: the mark passes both
        queued.end = end
        first = 0
        for job in jobs:
            job.estimate = None
            queued.previews.append((job, job.index, on_host[first : first + job.images]))
            first += job.images

    def _finish(self, jobs: list[Job]) -> None:
        """Decode the finished jobs' latents, batched by size, and answer them; a job
        interrupted before its first step (as it started) answers no images."""
        pipe = self.pipeline
        for job in [job for job in jobs if not job.index]:
            _answer_unmade(job)
        for size_jobs in _by_size([job for job in jobs if job.index]).values():
            start = mark(self.device)
            latents = torch.cat([j.latents for j in size_jobs])
            decoded = self._in_chunks(self.backend.decode_latents, latents / pipe.scaling_factor)
            self._charge(size_jobs, "vae_decoder", start)
            self.backend.synchronize()  # the device's work for these jobs is done: read it
            # NaN or inf latents decode to NaN: one read of the images finds both; the
            # latents are looked at only to name the network that failed.
            finite = torch.isfinite(decoded).flatten(1).all(1).tolist()
            first = 0
            for job in size_jobs:
                rows = slice(first, first + job.images)
                first += job.images
                if not all(finite[rows]):
                    self._fail(job, _non_finite(job.latents))
                    continue
                arrays = pipe.image_processor.postprocess(decoded[rows], output_type="np")
                images = pipe.image_processor.numpy_to_pil(arrays)
                if not job.future.done():
                    job.future.set_result(_result(job, images, list(arrays)))

    def _tell(self, job: Job, done: int, previews: Any = None) -> None:
        """Tell the job's progress hook (a protocol's) its steps done, and previews; a hook
        that fails fails its job alone, not the iteration of every job."""
        if job.progress is None:
            return
        try:
            job.progress(done, len(job.timesteps), previews)
        except Exception as exc:
            logger.exception("a progress hook failed")
            self._fail_active(job, exc)

    def _charge(self, jobs: list[Job], stage: str, start: Any) -> Any:
        """Charge the device's work queued since ``start`` to ``stage`` of each job, without
        waiting for it; the end mark."""
        end = mark(self.device)
        for job in jobs:
            job.spans.append((stage, start, end))
        return end

    def _fail_active(self, job: Job, exc: BaseException) -> None:
        """Fail ``job`` and take it out of the active jobs (it takes no more steps)."""
        self._fail(job, exc)
        if job in self.active:
            self.active.remove(job)

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count in this thread (None: left as it is), and for threads
    made meanwhile; the old count comes back after."""
    if count is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Queued:
    """A UNet step queued on the device: its end mark, its rows' finiteness flags and its
    previews' pixels (on the host once the device passes the mark), and which rows are
    whose."""

    end: Any
    finite: torch.Tensor
    rows: list[tuple[Job, slice]]
    previews: list[tuple[Job, int, torch.Tensor]] = field(default_factory=list)
    """(job, its steps done, its images' 8-bit pixels, NHWC), for each previewing job."""


def _result(job: Job, images: list[PIL.Image.Image], arrays: list[Any]) -> JobResult:
    """The job's answer: its images, the steps it ran, its times (read once the device has
    passed its calls)."""
    now = time.monotonic()
    waited = ((job.admitted or now) - job.submitted) * 1e3  # never admitted: till now
    total = (now - job.submitted) * 1e3
    return JobResult(
        images=images,
        arrays=arrays,
        seed=job.request.seed,
        unet_calls=job.index,
        queue_wait_ms=waited,
        timings_ms={**job.timings(), "total": total},
    )


def _answer_unmade(job: Job) -> None:
    """Answer a job interrupted before its first step: no images (nothing decoded)."""
    if not job.future.done():
        job.future.set_result(_result(job, [], []))


def _non_finite(latents: torch.Tensor) -> NonFiniteOutputError:
    return non_finite_error("unet" if not torch.isfinite(latents).all() else "vae_decoder")


def _by_size(jobs: list[Job]) -> dict[tuple[int, int], list[Job]]:
    groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.size, []).append(job)
    return groups
