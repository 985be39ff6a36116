"""`sdtrt serve`'s step batcher on the tiny model against the single-request pipeline
(exact alone, bounded in a mixed batch), its UNet call count, its limits, failure
isolation and warm-up. Its HTTP API: tests/test_http.py."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import threading
import time
from concurrent.futures import wait

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    noise_picture,
    pipeline_reference,
    pipeline_reference_images,
    serving,
)

from sdtrt.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NonFiniteOutputError,
    RequestCancelledError,
    ShapeOutsideProfileError,
)
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.schedulers import diffusers_scheduler, make_scheduler
from sdtrt.serve.app import create_app
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.server import BackgroundServer

# Measured on the tiny model, torch fp32 CPU: a request batched with four others of other
# strengths, schedulers, seeds, guidance and sizes differs from the same request alone by
# at most 6.2e-5 with the trained weights (7.4e-6 with random ones): batched kernels round
# differently, and trained weights carry it further. The bound leaves 3x (1/20 of an
# 8-bit level).
MIXED_BOUND = 2e-4


@pytest.fixture(scope="module")
def image():
    return noise_picture(0)


def _run_all(pipe, requests, options=ServeOptions()):
    """Queue every request, then start the worker: what is batched with what is fixed."""
    batcher = StepBatcher(pipe, options, start=False)
    rows: list[int] = []
    batcher.stats.on_unet_call.append(rows.append)
    futures = [batcher.submit(batcher.prepare(r)) for r in requests]
    batcher.start()
    try:
        return [f.result(timeout=120) for f in futures], rows
    finally:
        batcher.close()


@pytest.mark.parametrize(
    "scheduler, eta", [("lms", 0.0), ("euler_a", 0.0), ("ddim", 0.7), ("lcm", 0.0), ("tcd", 0.3)]
)
def test_a_request_served_alone_equals_the_pipeline_exactly(tiny, pipe, image, scheduler, eta):
    request = Img2ImgRequest(
        prompt="a cat",
        image=image,
        strength=0.6,
        num_inference_steps=10,
        scheduler=scheduler,
        eta=eta,
    )
    (result,), rows = _run_all(pipe, [request])
    assert np.array_equal(result.array, pipeline_reference(tiny, request, image))
    assert result.unet_calls == len(rows) == 6 and set(rows) == {2}
    assert result.image.size == (48, 32)


def test_a_guidance_cutoff_drops_a_jobs_uncond_row_for_the_steps_after_it(tiny, pipe, image):
    """``guidance_cutoff``: the job's steps up to int(steps x cutoff) on two rows, the rest
    on its cond row; alone, the pipeline's image with the cutoff callback exactly; batched
    with a job guided throughout and one at scale 1, each its own image, the calls' rows
    falling as the cutoff passes."""
    cut = Img2ImgRequest(prompt="a cat", image=image, strength=0.6, num_inference_steps=10,
                         guidance_cutoff=0.4)  # fmt: skip
    (result,), rows = _run_all(pipe, [cut])
    assert np.array_equal(result.array, pipeline_reference(tiny, cut, image))
    assert rows == [2, 2, 2, 1, 1, 1]  # 6 steps: the callback ends step int(0.4 * 6) = 2
    requests = [
        cut,
        Img2ImgRequest(prompt="a dog", image=image, strength=0.6, num_inference_steps=10),
        Img2ImgRequest(
            prompt="a red circle",
            image=image,
            strength=0.4,
            num_inference_steps=10,
            guidance_scale=1.0,
            guidance_cutoff=0.2,
        ),  # fmt: skip
    ]
    results, rows = _run_all(pipe, requests)
    assert rows == [5, 5, 5, 4, 3, 3]  # the unguided job's cutoff changes nothing
    for request, result in zip(requests, results, strict=True):
        want = pipeline_reference(tiny, request, image)
        assert float(np.abs(result.array - want).max()) <= MIXED_BOUND


def test_images_per_prompt_are_the_pipelines_batch_from_the_one_seed(tiny, pipe, image):
    """num_images_per_prompt: a job of n images, [uncond x n, cond x n] rows a step, drawn
    from its seed as diffusers draws a batch: alone, the pipeline's n images exactly (with a
    guidance cutoff too); batched with a one-image job, within the mixed-load bound."""
    three = Img2ImgRequest(prompt="a cat", image=image, strength=0.6, num_inference_steps=10,
                           num_images_per_prompt=3)  # fmt: skip
    (result,), rows = _run_all(pipe, [three])
    want = pipeline_reference_images(tiny, three, image)
    assert len(result.images) == len(result.arrays) == 3 and rows == [6] * 6
    for got, expected, picture in zip(result.arrays, want, result.images, strict=True):
        assert np.array_equal(got, expected) and picture.size == (48, 32)
    assert not np.array_equal(want[0], want[1])  # three draws, not one image thrice
    cut = dataclasses.replace(three, num_images_per_prompt=2, guidance_cutoff=0.5, seed=5)
    one = Img2ImgRequest(prompt="a dog", image=image, strength=0.6, num_inference_steps=10)
    results, rows = _run_all(pipe, [cut, one])
    assert rows == [6] * 4 + [4] * 2  # the cut job's steps after int(0.5 * 6) = 3: 2 rows
    for request, result in zip([cut, one], results, strict=True):
        want = pipeline_reference_images(tiny, request, image)
        assert len(result.arrays) == len(want) == request.num_images_per_prompt
        for got, expected in zip(result.arrays, want, strict=True):
            assert float(np.abs(got - expected).max()) <= MIXED_BOUND


def test_a_list_of_prompts_is_the_pipelines_batch(tiny, pipe, image):
    """prompt as diffusers' list (negative prompts one per prompt), two images each: the
    pipeline's batch of 4 in its order, exactly, alone; batched with a one-prompt job,
    within the mixed-load bound."""
    two = Img2ImgRequest(prompt=("a red circle", "a blue square"), negative_prompt=("", "dark"),
                         image=image, strength=0.6, num_inference_steps=10,
                         num_images_per_prompt=2)  # fmt: skip
    (result,), rows = _run_all(pipe, [two])
    want = pipeline_reference_images(tiny, two, image)
    assert len(want) == len(result.arrays) == 4 and rows == [8] * 6
    for got, expected in zip(result.arrays, want, strict=True):
        assert np.array_equal(got, expected)
    one = Img2ImgRequest(prompt="a dog", negative_prompt="a green triangle", image=image,
                         strength=0.6, num_inference_steps=10)  # fmt: skip
    results, rows = _run_all(pipe, [two, one])
    assert rows == [10] * 6
    for request, result in zip([two, one], results, strict=True):
        for got, expected in zip(result.arrays, pipeline_reference_images(tiny, request, image),
                                 strict=True):  # fmt: skip
            assert float(np.abs(got - expected).max()) <= MIXED_BOUND


@pytest.mark.parametrize(
    "prompt, negative",
    [((), ""), (("a", 2), ""), (("a", "b"), ("x", "y", "z")), ("a", 5)],
)
def test_prompts_are_refused_as_the_pipeline_refuses_them(pipe, image, prompt, negative):
    def listed(texts):  # diffusers' list where the request holds a tuple
        return list(texts) if isinstance(texts, tuple) else texts

    with pytest.raises(InvalidInputError) as refused:
        pipe(listed(prompt), image, negative_prompt=listed(negative))
    request = Img2ImgRequest(prompt=prompt, negative_prompt=negative, image=image)
    with pytest.raises(InvalidInputError, match=re.escape(str(refused.value))):
        StepBatcher(pipe, start=False).prepare(request)


@pytest.mark.parametrize(
    "images, guidance, says",
    [
        (0, 8.0, "num_images_per_prompt must be an integer >= 1, got 0"),
        (1.5, 8.0, "num_images_per_prompt must be an integer >= 1, got 1.5"),
        (
            9,
            8.0,
            "9 images take 18 UNet rows a step (2 each at this guidance); this server's "
            "calls take 16: at most 8 images per request",
        ),  # fmt: skip
        (17, 1.0, "17 images take 17 UNet rows a step (1 each at this guidance)"),
    ],
)
def test_images_per_prompt_must_fit_one_unet_call(pipe, image, images, guidance, says):
    batcher = StepBatcher(pipe, start=False)
    request = Img2ImgRequest(image=image, num_images_per_prompt=images, guidance_scale=guidance)
    with pytest.raises(InvalidInputError, match=re.escape(says)):
        batcher.prepare(request)
    most = 8 if guidance > 1 else 16  # what 16 rows a call hold
    assert batcher.prepare(dataclasses.replace(request, num_images_per_prompt=most)).images == most


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_inference_steps=0),
        dict(guidance_scale=float("nan")),
        dict(strength=1.5),
        dict(strength=None, start_step=20),
        dict(eta=2.0),
        dict(timesteps=[900, 500], sigmas=[3.0, 1.0]),
        dict(sigmas=[1.0, 3.0]),
        dict(scheduler="ddim", num_inference_steps=1001, strength=0.5),
        dict(height=36),
        dict(num_images_per_prompt=0),
    ],
)
def test_a_request_is_refused_as_the_pipeline_refuses_its_call(pipe, image, bad):
    """The server checks a request with the pipeline's own checks (``Img2ImgPipeline.plan``):
    the same refusal, in the same words."""
    fields = {"num_inference_steps": 20, **bad}
    scheduler = make_scheduler(fields.pop("scheduler", "lms"), pipe.model_scheduler_config)
    with pytest.raises(InvalidInputError) as refused:
        pipe.plan(image, scheduler, **fields)
    request = Img2ImgRequest(image=image, **{"num_inference_steps": 20, **bad})
    with pytest.raises(InvalidInputError, match=re.escape(str(refused.value))):
        StepBatcher(pipe, start=False).prepare(request)


def test_a_request_takes_one_picture_not_latents_nor_several(pipe, image):
    batcher = StepBatcher(pipe, start=False)
    latents = torch.zeros(1, 4, 4, 6)
    with pytest.raises(InvalidInputError, match="the server takes no latents"):
        batcher.prepare(Img2ImgRequest(image=latents))
    pixels = torch.rand(2, 3, 32, 48)
    with pytest.raises(InvalidInputError, match="a request takes one image, got 2"):
        batcher.prepare(Img2ImgRequest(image=pixels))
    assert batcher.prepare(Img2ImgRequest(image=pixels[:1])).size == (32, 48)


def test_a_servers_guidance_cutoff_is_what_a_request_without_one_gets(tiny, pipe, image):
    """``sdtrt serve --guidance-cutoff 0.25``: a request that sends none is cut off there
    (as /docs says), one that sends 1 is guided throughout; each the pipeline's image
    (batched together: within the mixed-load bound)."""
    from sdtrt.serve.fields import openapi

    options = ServeOptions(guidance_cutoff=0.25)
    server = StepBatcher(pipe, options, start=False)  # its defaults; _run_all runs another
    schema = openapi(server.request_defaults)["requestBody"]["content"]["application/json"]
    assert schema["schema"]["properties"]["guidance_cutoff"]["default"] == 0.25
    requests = [
        server.request(image=image, strength=0.5, num_inference_steps=8),
        server.request(image=image, strength=0.5, num_inference_steps=8, guidance_cutoff=1.0),
    ]
    assert [r.guidance_cutoff for r in requests] == [0.25, 1.0]
    results, rows = _run_all(pipe, requests, options)
    assert rows == [4, 4, 3, 3]  # 4 steps: the first job's guided up to int(0.25 * 4) = 1
    for request, result in zip(requests, results, strict=True):  # batched: within the bound
        want = pipeline_reference(tiny, request, image)
        assert float(np.abs(result.array - want).max()) <= MIXED_BOUND
    with pytest.raises(InvalidInputError, match=r"guidance cutoff must be a number in \[0, 1\]"):
        ServeOptions(guidance_cutoff=2.0)


def test_the_worker_steps_only_while_it_holds_the_pipelines_one_call_lock(pipe, image):
    """A direct call on the pipeline the server batches on holds its one-call lock (the
    backend's buffers are shared): the worker waits for it, and runs on once it is free."""
    batcher = StepBatcher(pipe, start=False)
    rows: list[int] = []
    batcher.stats.on_unet_call.append(rows.append)
    request = Img2ImgRequest(prompt="a cat", image=image, strength=0.6, num_inference_steps=10)
    try:
        with pipe.one_call:  # what a direct call holds for its whole run
            batcher.start()
            time.sleep(0.5)
            assert not batcher.warmed.done()  # the warm-up waits too
        batcher.warmed.result(timeout=60)
        with pipe.one_call:
            future = batcher.submit(batcher.prepare(request))
            done, _ = wait([future], timeout=1.0)
            assert not done and rows == []
        assert future.result(timeout=60).unet_calls == len(rows) == 6
    finally:
        batcher.close()


def _new_thread_threads():
    """PyTorch's intra-op threads in a thread made now."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.parametrize("threads", [1, 2, None])
def test_the_worker_runs_with_its_intra_op_threads(pipe, image, threads):
    """On the CPU the worker sets its own PyTorch thread count (None: leaves PyTorch's),
    and gives the process its old one back when it stops; the caller's is untouched."""
    ours, default = torch.get_num_threads(), _new_thread_threads()
    batcher = StepBatcher(pipe, ServeOptions(intra_op_threads=threads), start=False)
    seen = []
    batcher.stats.on_unet_call.append(lambda rows: seen.append(torch.get_num_threads()))
    request = Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4)
    future = batcher.submit(batcher.prepare(request))
    batcher.start()
    try:
        assert future.result(timeout=120).unet_calls == 2
    finally:
        batcher.close()
    assert seen == [threads or default] * 2
    assert torch.get_num_threads() == ours and _new_thread_threads() == default


@pytest.mark.parametrize("given, threads", [([], 1), (["3"], 3), (["auto"], None)])
def test_the_cli_reads_intra_op_threads(given, threads):
    from sdtrt.cli import build_parser
    from sdtrt.cli.serve import intra_op_threads_from

    for command in ("serve", "bench-serve"):
        flag = ["--intra-op-threads", *given] if given else []
        args = build_parser().parse_args([command, *flag])
        assert intra_op_threads_from(args) == threads


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_intra_op_threads_must_be_a_positive_integer(threads):
    with pytest.raises(InvalidInputError, match="intra-op threads must be an integer >= 1"):
        ServeOptions(intra_op_threads=threads)


MIXED = [  # strength, scheduler, guidance, height, width
    (0.3, "lms", 8.0, 32, 48),
    (0.9, "euler_a", 1.0, 32, 48),
    (0.6, "ddim", 5.0, 32, 48),
    (1.0, "pndm", 7.0, 64, 32),
    (0.5, "dpmpp_2m", 8.0, 64, 32),
]


def test_a_mixed_load_is_one_unet_call_per_iteration_within_the_bound(tiny, pipe, image):
    requests = [
        Img2ImgRequest(
            prompt=f"prompt {i}",
            image=image,
            strength=s,
            num_inference_steps=10,
            scheduler=sc,
            guidance_scale=g,
            seed=100 + i,
            height=h,
            width=w,
        )
        for i, (s, sc, g, h, w) in enumerate(MIXED)
    ]
    results, rows = _run_all(pipe, requests)
    steps = [r.unet_calls for r in results]
    assert steps == [3, 9, 6, 11, 5]  # PNDM (PLMS) runs one UNet call more than its steps
    # Two size groups served in turn: as many calls as the longest job of each group,
    # not the sum of the requests' steps.
    assert len(rows) == 9 + 11 < sum(steps)
    assert max(rows) == 2 + 1 + 2  # the first group: two guided jobs and one at scale 1
    for request, result in zip(requests, results, strict=True):
        want = pipeline_reference(tiny, request, image)
        assert result.array.shape == want.shape
        assert float(np.abs(result.array - want).max()) <= MIXED_BOUND, request.scheduler


def test_a_server_with_taesd_batches_its_latents_without_a_draw(tiny, taesd, images):
    """A TAESD server (``--vae TAESD_DIR``): its encoder gives each job's latents, batched
    over the jobs of one size; each image is the pipeline's with that VAE, as a mixed load
    is (the encoder batched with another image)."""
    components = {**tiny, "vae": taesd[1]}
    pipe = Img2ImgPipeline.from_components(components, "torch", show_progress=False)
    requests = [
        Img2ImgRequest(prompt="a cat", image=picture, strength=0.6, num_inference_steps=10)
        for picture in images
    ]
    results, rows = _run_all(pipe, requests)
    assert rows == [4] * 6  # both jobs in every UNet call
    for request, result in zip(requests, results, strict=True):
        want = pipeline_reference(components, request, request.image)
        assert result.array.shape == want.shape == (32, 48, 3)
        assert float(np.abs(result.array - want).max()) <= MIXED_BOUND


def test_the_mixed_load_on_onnxruntime_equals_the_torch_servers(tiny, exported, image):
    """``sdtrt serve --backend onnxruntime``: the exported graphs take a timestep per row and
    any row count, so the same load batches the same way; each image is the torch server's
    within fp32 graph noise."""
    requests = [
        Img2ImgRequest(image=image, strength=s, num_inference_steps=10, scheduler=sc,
                       guidance_scale=g, seed=100 + i, height=h, width=w)
        for i, (s, sc, g, h, w) in enumerate(MIXED)
    ]  # fmt: skip
    graph = Img2ImgPipeline.from_pretrained(exported.root, backend="onnxruntime")
    got, rows = _run_all(graph, requests)
    want, torch_rows = _run_all(Img2ImgPipeline.from_components(tiny, "torch"), requests)
    assert rows == torch_rows and max(rows) == 5
    for request, a, b in zip(requests, got, want, strict=True):
        assert a.unet_calls == b.unet_calls
        assert float(np.abs(a.array - b.array).max()) <= MIXED_BOUND, request.scheduler


def test_max_rows_bounds_every_call_and_the_rest_wait(pipe, image):
    requests = [
        Img2ImgRequest(image=image, strength=0.5, num_inference_steps=8, seed=i) for i in range(5)
    ]
    results, rows = _run_all(pipe, requests, ServeOptions(max_rows=4))
    assert max(rows) == 4 and len(results) == 5
    assert results[4].queue_wait_ms > results[0].queue_wait_ms  # admitted when rows freed


def test_request_level_and_one_at_a_time_policies(pipe, image):
    same = [
        Img2ImgRequest(image=image, strength=0.5, num_inference_steps=8, seed=i) for i in range(3)
    ]
    other = Img2ImgRequest(image=image, strength=0.75, num_inference_steps=8, seed=9)
    _, rows = _run_all(pipe, [*same, other], ServeOptions(policy="request", queue_delay=0))
    # the three identical requests as one batch (4 steps of 6 rows), then the other alone
    assert rows == [6] * 4 + [2] * 6
    _, rows = _run_all(pipe, [*same, other], ServeOptions(policy="single"))
    assert rows == [2] * (3 * 4 + 6)


class _OneTimestepBackend:
    """The torch backend as a graph that takes one timestep for all rows (optimum's)."""

    per_row_timesteps = False

    def __init__(self, backend):
        self._backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def unet(self, sample, timestep, hidden):
        assert bool((timestep == timestep[0]).all()), "rows at different timesteps"
        self.calls.append(sample.shape[0])
        return self._backend.unet(sample, timestep, hidden)


def test_a_scalar_timestep_graph_is_batched_by_timestep(tiny, image):
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    pipe.backend = backend = _OneTimestepBackend(pipe.backend)
    requests = [
        Img2ImgRequest(image=image, strength=s, num_inference_steps=10, seed=i)
        for i, s in enumerate([0.5, 0.5, 0.3])
    ]
    results, _ = _run_all(pipe, requests)
    assert [r.unet_calls for r in results] == [5, 5, 3]
    assert len(backend.calls) == 5 + 3 and max(backend.calls) == 4


class _PoisonedBackend(_OneTimestepBackend):
    """Fails the rows of one prompt: the UNet call that holds them raises, or (``nan``)
    answers NaN for them. Without a poison, every VAE decode answers NaN."""

    per_row_timesteps = True

    def __init__(self, backend, poison=None, nan=False):
        super().__init__(backend)
        self.poison, self.nan = poison, nan
        self.poisoned_calls = 0

    def unet(self, sample, timestep, hidden):
        rows = (hidden == self.poison).flatten(1).all(1) if self.poison is not None else None
        self.poisoned_calls += rows is not None and bool(rows.any())
        if rows is not None and not self.nan and bool(rows.any()):
            raise RuntimeError("poisoned rows")
        out = self._backend.unet(sample, timestep, hidden)
        if rows is not None and self.nan:
            out[rows] = float("nan")
        return out

    def decode_latents(self, latents):
        out = self._backend.decode_latents(latents)
        return out if self.poison is not None else out * float("nan")


def _the_middle_one_fails(pipe, requests, error, says):
    """Three requests queued, then run: the second fails with ``error``; the others'
    results."""
    batcher = StepBatcher(pipe, start=False)
    futures = [batcher.submit(batcher.prepare(r)) for r in requests]
    batcher.start()
    try:
        with pytest.raises(error, match=says):
            futures[1].result(timeout=60)
        return [futures[i].result(timeout=60) for i in (0, 2)]
    finally:
        batcher.close()


@pytest.mark.parametrize(
    "nan, error, says",
    [
        (False, RuntimeError, "poisoned rows"),
        (True, NonFiniteOutputError, "the denoising loop produced NaN"),
    ],
)
def test_one_failing_job_fails_only_its_request(tiny, image, nan, error, says):
    """A job whose UNet call raises fails alone (the batched call is retried job by job);
    one whose UNet output went NaN fails once the worker reads that step's finiteness
    flags (on a GPU after its next step; here, where nothing runs ahead, at once), not at
    its end, naming the loop. The jobs batched with it are unharmed."""
    from sdtrt.runtime.steps import token_ids

    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    poison = pipe.backend.encode_text(token_ids(pipe.tokenizer, ["poison"]))[0]
    pipe.backend = backend = _PoisonedBackend(pipe.backend, poison, nan)
    requests = [
        Img2ImgRequest(prompt=p, image=image, strength=0.5, num_inference_steps=16, seed=1)
        for p in ("fine", "poison", "also fine")
    ]
    for i, got in zip((0, 2), _the_middle_one_fails(pipe, requests, error, says), strict=True):
        want = pipeline_reference(tiny, requests[i], image)
        assert float(np.abs(got.array - want).max()) <= MIXED_BOUND
    # Its batched call and its retry alone (raising), or its first step (NaN): not its 8.
    assert backend.poisoned_calls == (2 if not nan else 1)


class _OneImageVaeBackend(_OneTimestepBackend):
    """The VAE runs out of memory on more than one image at a time, and refuses a black
    image whatever the batch."""

    per_row_timesteps = True

    def encode_image(self, pixels):
        if bool((pixels == -1).flatten(1).all(1).any()):
            raise RuntimeError("a poisoned image")
        if pixels.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self._backend.encode_image(pixels)

    def decode_latents(self, latents):
        if latents.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self._backend.decode_latents(latents)


class _TwoImageProfileBackend(_OneTimestepBackend):
    """A TensorRT-like backend whose text encoder and VAE engines take two prompts or
    images a call (their profiles refuse more), while its UNet takes more rows."""

    per_row_timesteps = True
    max_image_rows = 2

    def __init__(self, backend):
        super().__init__(backend)
        self.image_calls: list[tuple[str, int]] = []

    def _bounded(self, name, batch):
        self.image_calls.append((name, batch.shape[0]))
        if batch.shape[0] > self.max_image_rows:
            raise ShapeOutsideProfileError(f"{name}: {batch.shape[0]} rows, the profile takes 2")
        return getattr(self._backend, name)(batch)

    def encode_text(self, ids):
        return self._bounded("encode_text", ids)

    def encode_image(self, pixels):
        return self._bounded("encode_image", pixels)

    def decode_latents(self, latents):
        return self._bounded("decode_latents", latents)


def test_text_and_vae_batches_are_chunked_to_the_engines_profile(tiny, image, caplog):
    """Five jobs admitted together (unguided ones take one UNet row each) are encoded and
    decoded two at a time, never in a batch the text or VAE engine's profile refuses (which
    the worker would retry job by job); their images are the pipeline's."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    pipe.backend = backend = _TwoImageProfileBackend(pipe.backend)
    requests = [
        Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4, seed=s, guidance_scale=g)
        for s, g in enumerate([1.0, 1.0, 1.0, 7.5, 1.0])
    ]
    with caplog.at_level(logging.WARNING, logger="sdtrt.serve.batcher"):
        results, rows = _run_all(pipe, requests, ServeOptions(max_rows=6))
    assert rows == [6, 6]
    assert not [r for r in caplog.records if "running" in r.getMessage()]
    calls = {
        name: [n for c, n in backend.image_calls if c == name] for name, _ in backend.image_calls
    }
    # 5 prompts then 1 negative prompt; 5 images in, 5 latents out
    assert calls == {
        "encode_text": [2, 2, 1, 1],
        "encode_image": [2, 2, 1],
        "decode_latents": [2, 2, 1],
    }
    for request, got in zip(requests, results, strict=True):
        want = pipeline_reference(tiny, request, image)
        assert float(np.abs(got.array - want).max()) <= MIXED_BOUND


class _StaticRowsBackend(_TwoImageProfileBackend):
    """Its UNet refuses one row (a backend that does not pad a call of fewer rows than it
    takes, as sdtrt's TensorRT engines do)."""

    def unet(self, sample, timestep, hidden):
        if sample.shape[0] == 1:
            raise ShapeOutsideProfileError("unet: 1 row, the profile takes 2 to 4")
        return self._backend.unet(sample, timestep, hidden)


def test_the_warm_up_runs_every_shape_the_engines_take(tiny):
    """Row counts an engine refuses are skipped, not the end of the warm-up; text and VAE
    batches stop at the engines' image bound (what the worker forms)."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    pipe.backend = backend = _StaticRowsBackend(pipe.backend)
    batcher = StepBatcher(pipe, ServeOptions(max_rows=4, warmup_sizes="32x48"))
    try:
        # text 1-2, VAE encoder 1-2, UNet 2-4 rows, VAE decoder 1-2
        assert batcher.warmed.result(timeout=120) == 2 + 2 + 3 + 2
    finally:
        batcher.close()
    assert max(n for _, n in backend.image_calls) == 2


class _ProfiledSizesBackend(_OneTimestepBackend):
    """Engines built for heights of 32 px and widths of 32-48 px."""

    per_row_timesteps = True
    pixel_range = ((32, 32), (32, 48))


@pytest.mark.parametrize(
    "scheduler, steps, says",
    [
        ("ddim", 1001, "ddim takes at most 1000 steps (the model's training timesteps), got 1001"),
        ("lcm", 51, "LCMScheduler takes at most 50 steps (its schedule is a subset of the 50 "),
        ("tcd", 51, "TCDScheduler takes at most 50 steps (its schedule is a subset of the 50 "),
    ],
)
def test_steps_a_scheduler_cannot_schedule_are_refused_before_any_work(
    tiny, image, monkeypatch, scheduler, steps, says
):
    """With SDTRT_MAX_STEPS raised, DDIM at more steps than the model's 1000 training
    timesteps, and LCM and TCD at more than the 50 they were distilled with, failed inside
    diffusers' set_timesteps (a ValueError after the prompts were encoded; a 500 from the
    server): now refused by the pipeline and the server's intake. LMS takes them, as in
    diffusers."""
    monkeypatch.setenv("SDTRT_MAX_STEPS", "2000")
    pipe = Img2ImgPipeline.from_components(tiny, "torch", scheduler, show_progress=False)

    def no_work(*args):
        raise AssertionError("a network ran")

    for network in ("encode_text", "encode_image", "unet", "decode_latents"):
        monkeypatch.setattr(pipe.backend, network, no_work)
    with pytest.raises(InvalidInputError, match=re.escape(says)):
        pipe("a", image, num_inference_steps=steps, strength=1.5 / steps)  # one step
    batcher = StepBatcher(pipe, ServeOptions(), start=False)
    with pytest.raises(InvalidInputError, match=re.escape(says)):
        batcher.prepare(Img2ImgRequest(image=image, scheduler=scheduler, num_inference_steps=steps))
    lms = Img2ImgRequest(
        image=image, scheduler="lms", num_inference_steps=steps, strength=1.5 / steps
    )
    assert batcher.prepare(lms).t_start == steps - 1
    diffusers_own = diffusers_scheduler(scheduler, tiny["scheduler"].config)
    with pytest.raises(ValueError):  # what the check spares the caller
        diffusers_own.set_timesteps(steps)
    diffusers_own.set_timesteps(steps - 1)  # the most it takes


def test_a_scheduler_that_cannot_step_the_models_prediction_is_refused_first(
    tiny, image, monkeypatch
):
    """A model predicting the clean sample (prediction_type "sample"): diffusers' PNDM and
    Euler ancestral raise at their first step, after the prompts and the image were
    encoded (a 500 from the server). Refused before any network, naming the schedulers
    that do take it; which ones fail is asked of diffusers itself, step by step."""
    from sdtrt.runtime.schedulers import SCHEDULERS

    config = {**tiny["scheduler"].config, "prediction_type": "sample"}
    failing = []
    for name in SCHEDULERS:
        scheduler = diffusers_scheduler(name, config)
        scheduler.set_timesteps(3)
        latents = torch.zeros(1, 4, 4, 4)
        try:
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(latents, t)
                latents = scheduler.step(torch.zeros_like(model_input), t, latents).prev_sample
        except (ValueError, NotImplementedError):
            failing.append(name)
    assert failing == ["pndm", "euler_a"]

    sample_model = {**tiny, "scheduler": type(tiny["scheduler"]).from_config(config)}
    pipe = Img2ImgPipeline.from_components(sample_model, "torch", "pndm", show_progress=False)
    for network in ("encode_text", "encode_image", "unet", "decode_latents"):
        monkeypatch.setattr(pipe.backend, network, _no_work)
    says = "PNDMScheduler cannot step this model, which predicts 'sample': choose another "
    with pytest.raises(InvalidInputError, match=re.escape(says)) as info:
        pipe("a", image, num_inference_steps=4)
    assert str(info.value).endswith(
        "(lms, ddim, euler, dpmpp_2m, unipc, lms_karras, dpmpp_2m_karras, dpmpp_2m_sde_karras, "
        "ddim_trailing, lcm, tcd)"
    )
    batcher = StepBatcher(pipe, ServeOptions(), start=False)
    with pytest.raises(InvalidInputError, match="EulerAncestralDiscreteScheduler cannot step"):
        batcher.prepare(Img2ImgRequest(image=image, scheduler="euler_a", num_inference_steps=4))
    assert batcher.prepare(Img2ImgRequest(image=image, scheduler="euler", num_inference_steps=4))


def _no_work(*args):
    raise AssertionError("a network ran")


def test_a_size_the_engines_do_not_take_is_refused_before_any_work(tiny, image):
    """Checked where the size is known (the request, the warm-up sizes, the pipeline's
    call), with the sizes allowed; over HTTP a 422. The server warms up at the engines'
    smallest size (the sample picture's 512x512 is outside these profiles)."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    pipe.backend = backend = _ProfiledSizesBackend(pipe.backend)
    says = "64x32 px .* heights 32-32 and widths 32-48 px"
    with pytest.raises(ShapeOutsideProfileError, match=says):
        pipe("a", image, height=64, width=32, num_inference_steps=4)
    with pytest.raises(ShapeOutsideProfileError, match="64x64 px"):
        StepBatcher(pipe, ServeOptions(warmup_sizes="64x64"), start=False)
    assert backend.calls == []  # no UNet call on either
    with serving(pipe, ServeOptions(max_rows=4)) as running:
        assert backend.calls == [2, 2]  # the warm-up request: 2 steps at 32x32
        small = {"num_inference_steps": 4, "strength": 0.5, "seed": 3}
        url, fields = f"{running.url}/v1/img2img", {**small, "height": 64, "width": 32}
        refused = httpx.post(url, json=fields, timeout=60)
        assert refused.status_code == 422 and re.search(says, refused.json()["error"])
        fitting = httpx.post(url, json={**fields, "height": 32}, timeout=60)
        assert fitting.status_code == 200
        assert PIL.Image.open(io.BytesIO(fitting.content)).size == (32, 32)


def test_a_failed_batched_encode_or_decode_is_run_job_by_job(tiny, image):
    """New jobs are encoded together and finished ones decoded together: where that fails,
    each job runs alone, and only the one that fails alone fails (before, every job in
    flight failed with it)."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    pipe.backend = _OneImageVaeBackend(pipe.backend)
    black = PIL.Image.new("RGB", image.size)
    requests = [
        Img2ImgRequest(image=picture, strength=0.5, num_inference_steps=6, seed=seed)
        for seed, picture in ((1, image), (2, black), (3, image))
    ]
    results = _the_middle_one_fails(pipe, requests, RuntimeError, "a poisoned image")
    for i, got in zip((0, 2), results, strict=True):
        assert got.unet_calls == 3
        want = pipeline_reference(tiny, requests[i], image)
        assert float(np.abs(got.array - want).max()) <= MIXED_BOUND


def test_a_job_whose_scheduler_step_fails_fails_alone(tiny, pipe, image, monkeypatch):
    """The failure comes after the batched UNet call, in one job's scheduler update: the
    jobs already updated in that step are not updated twice (their results stay the
    pipeline's), the one that failed fails alone."""
    from sdtrt.serve import batcher as batcher_module

    real_step = batcher_module.step

    def step(scheduler, pred, t, latents, guidance_scale, extra):
        if guidance_scale == 7.25:
            raise RuntimeError("the scheduler failed")
        return real_step(scheduler, pred, t, latents, guidance_scale, extra)

    monkeypatch.setattr(batcher_module, "step", step)
    requests = [  # the first one's one step is the step where the second one fails
        Img2ImgRequest(image=image, strength=0.5, num_inference_steps=n, seed=1, guidance_scale=g)
        for n, g in ((2, 8.0), (6, 7.25), (6, 6.0))
    ]
    (first, last), _ = _run_all(pipe, requests[::2])
    results = _the_middle_one_fails(pipe, requests, RuntimeError, "the scheduler failed")
    for got, alone, calls in zip(results, (first, last), (1, 3), strict=True):
        assert got.unet_calls == alone.unet_calls == calls
        assert float(np.abs(got.array - alone.array).max()) <= MIXED_BOUND


def test_non_finite_images_name_the_vae_decoder(pipe, image):
    plain = pipe.backend
    pipe.backend = _PoisonedBackend(plain)  # finite latents, NaN images
    try:
        with pytest.raises(NonFiniteOutputError, match="the VAE decoder produced NaN"):
            _run_all(pipe, [Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4)])
    finally:
        pipe.backend = plain


class _ValueReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values into Python (each one waits for the GPU there)."""

    READS = frozenset(
        ["__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "nonzero"]
    )

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", ["lms", "euler_a"])
def test_a_step_reads_no_tensor_value(tiny, image, scheduler):
    """The worker never waits for the device inside a step (it may run RUN_AHEAD steps
    ahead of the GPU): no finiteness check, clock or timestep read in the UNet call and
    the schedulers' updates. On this CPU a read costs nothing; here every read is counted,
    so the test takes schedulers that read none (DPM++ and UniPC read host-side sigmas,
    which on a GPU wait for nothing; DDIM, PNDM and Euler read device timesteps in
    diffusers' own code)."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    counts = []

    class Counted(StepBatcher):
        def _unet_call(self, jobs):
            with _ValueReads() as mode:
                super()._unet_call(jobs)
            counts.append(len(mode.reads))

    requests = [
        Img2ImgRequest(image=image, strength=s, num_inference_steps=10, scheduler=scheduler)
        for s in (0.5, 0.8)
    ]
    pipeline_reference(tiny, requests[1], image)  # the schedule's memo is shared: warm it
    batcher = Counted(pipe, start=False)
    futures = [batcher.submit(batcher.prepare(r)) for r in requests]
    batcher.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert [r.unet_calls for r in results] == [5, 8]
    assert counts == [0] * 8
    assert all(r.timings_ms["denoise"] > 0 for r in results)


def test_a_cancelled_or_late_job_is_dropped_at_the_next_step(pipe, image):
    batcher = StepBatcher(pipe, start=False)
    long = Img2ImgRequest(image=image, strength=1.0, num_inference_steps=200)
    cancelled = batcher.prepare(long)
    late = batcher.prepare(long, timeout=0.3)
    kept = batcher.prepare(Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4))
    futures = [batcher.submit(job) for job in (cancelled, late, kept)]
    batcher.start()
    try:
        time.sleep(0.2)
        cancelled.cancel()
        with pytest.raises(RequestCancelledError):
            futures[0].result(timeout=30)
        with pytest.raises(DeadlineExceededError):
            futures[1].result(timeout=30)
        assert futures[2].result(timeout=30).unet_calls == 2
        assert cancelled.index < 200 and late.index < 200  # neither ran to the end
        deadline = time.monotonic() + 10
        while not batcher.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.idle
    finally:
        batcher.close()


class _ShapeSpy:
    """Every shape (with dtype, strides and device) each network of ``backend`` runs."""

    NETWORKS = ("encode_text", "encode_image", "unet", "decode_latents")

    def __init__(self, backend):
        self.seen = {name: set() for name in self.NETWORKS}
        for name in self.NETWORKS:
            setattr(backend, name, self._recording(name, getattr(backend, name)))

    def _recording(self, name, call):
        def recorded(*tensors):
            key = tuple((tuple(t.shape), t.dtype, t.stride(), t.device.type) for t in tensors)
            self.seen[name].add(key)
            return call(*tensors)

        return recorded

    def take(self):
        seen = {name: set(shapes) for name, shapes in self.seen.items()}
        for shapes in self.seen.values():
            shapes.clear()
        return seen


# Sizes, guidance and strengths that make the worker form UNet calls of 1 to 4 rows and
# decode 1 or 2 images at once, at two sizes (max_rows 4).
WARM_LOAD = [
    ((32, 48), 5.0, 0.5),
    ((32, 48), 1.0, 0.7),
    ((32, 48), 1.0, 0.3),
    ((32, 32), 5.0, 0.6),
    ((32, 32), 1.0, 0.4),
    ((32, 48), 5.0, 0.9),
    ((32, 32), 1.0, 0.6),
]


def test_the_warm_up_runs_every_shape_a_load_then_forms(tiny, image):
    """With warm-up sizes the worker first runs each network at every batch it can form
    there, with the arguments' own dtypes, strides and devices (what CUDA graph captures
    and torch.compile key on); a mixed load afterwards forms no shape the warm-up did not,
    and its images are those of a server without the warm-up, bit for bit."""
    requests = [
        Img2ImgRequest(
            image=image, height=h, width=w, guidance_scale=g, strength=s, num_inference_steps=6
        )
        for (h, w), g, s in WARM_LOAD
    ]
    cold, _ = _run_all(
        Img2ImgPipeline.from_components(tiny, "torch"), requests, ServeOptions(max_rows=4)
    )
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    spy = _ShapeSpy(pipe.backend)
    batcher = StepBatcher(pipe, ServeOptions(max_rows=4, warmup_sizes="32x48,32x32"), start=False)
    warmed = {}
    warm_up = batcher._run_warmup_shapes

    def recorded():
        shapes = warm_up()
        warmed.update(spy.take())
        return shapes

    batcher._run_warmup_shapes = recorded
    futures = [batcher.submit(batcher.prepare(r)) for r in requests]  # batched as `cold`
    spy.take()  # what `prepare` ran: nothing
    batcher.start()
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    assert batcher.warmed.exception(timeout=0) is None
    assert {key[0][0][0] for key in warmed["unet"]} == {1, 2, 3, 4}
    assert {key[0][0][2:] for key in warmed["unet"]} == {(4, 6), (4, 4)}  # latent sizes
    assert len(warmed["unet"]) == len(warmed["encode_image"]) == 8
    assert len(warmed["decode_latents"]) == 8
    assert len(warmed["encode_text"]) == 8  # 1-4 jobs of each size, admitted together
    load = spy.take()
    assert len({key[0][0][0] for key in load["unet"]}) >= 3  # a load of several row counts
    for name, shapes in load.items():
        assert shapes <= warmed[name], (name, shapes - warmed[name])
    for result, alone in zip(results, cold, strict=True):
        assert np.array_equal(result.array, alone.array)


def test_warm_up_sizes_are_checked_when_the_server_starts(pipe):
    assert ServeOptions(warmup_sizes="32x48,16X16").warmup_sizes == ((32, 48), (16, 16))
    assert ServeOptions(warmup_sizes=[[32, 48]]).warmup_sizes == ((32, 48),)
    with pytest.raises(InvalidInputError, match="warm-up sizes: HxW,HxW"):
        ServeOptions(warmup_sizes="32")
    with pytest.raises(InvalidInputError, match="height 36 is not a multiple of 8 px"):
        StepBatcher(pipe, ServeOptions(warmup_sizes=((36, 48),)), start=False)


def test_a_failed_warm_up_keeps_ready_503(tiny):
    """A network failing at a warm-up shape (memory run out at the largest batch, say):
    /ready says 503 for good and the server says why; /health still answers."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    unet = pipe.backend.unet

    def unet_to_three_rows(sample, *rest):
        if sample.shape[0] > 3:
            raise RuntimeError("out of memory at 4 rows")
        return unet(sample, *rest)

    pipe.backend.unet = unet_to_three_rows
    options = ServeOptions(max_rows=4, warmup_sizes=((32, 32),))
    batcher = StepBatcher(pipe, options)
    app = create_app(batcher, options)
    with BackgroundServer(app) as running:
        assert str(batcher.warmed.exception(timeout=120)) == "out of memory at 4 rows"
        deadline = time.monotonic() + 30
        while not app.state.sdtrt.get("warmup_failed") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{running.url}/ready").status_code == 503
        assert httpx.get(f"{running.url}/health").status_code == 200
    batcher.close()


# --- HTTP --------------------------------------------------------------------------


def test_a_failing_progress_hook_fails_its_job_alone(pipe, image):
    """A protocol's progress hook that raises (after its job's 2nd step) fails that job with
    its error; the job batched beside it is answered (its 4 steps)."""
    batcher = StepBatcher(pipe, start=False)
    request = Img2ImgRequest(image=image, strength=1.0, num_inference_steps=4)
    failing, beside = batcher.prepare(request), batcher.prepare(request)

    def hook(done, steps, previews=None):
        if done == 2:
            raise RuntimeError("the hook broke")

    failing.progress = hook
    futures = [batcher.submit(job) for job in (failing, beside)]
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="the hook broke"):
            futures[0].result(timeout=30)
        assert futures[1].result(timeout=30).unet_calls == 4 and failing.index == 2
    finally:
        batcher.close()
