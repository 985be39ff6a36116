"""A job interrupted (``Job.interrupt``: A1111's Interrupt and Skip, serve/a1111.py)
finishes with the steps it has taken, as diffusers' ``pipe._interrupt`` leaves a pipeline:
the same image, exactly; one not started yet answers no images; the worker loses none."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import noise_picture

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.batcher import StepBatcher, intra_op_threads
from sdtrt.serve.jobs import Img2ImgRequest, Job
from sdtrt.serve.options import ServeOptions


@pytest.fixture(scope="module")
def image():
    return noise_picture(0)


def test_an_interrupted_job_is_the_pipelines_image_interrupted_at_the_same_step(
    tiny, pipe, image, monkeypatch
):
    """Interrupted after its 3rd of 8 steps, while the worker encodes a job that came then
    (between two of its steps: the request's interrupt comes at any time), a job takes no
    further step and answers the image diffusers' ``pipe._interrupt`` gives when a step-end
    callback sets it after the 3rd step, exactly; the job that came runs to its end."""
    batcher = StepBatcher(pipe, start=False)
    request = Img2ImgRequest(image=image, prompt="a cat", strength=0.8, num_inference_steps=10,
                             seed=4)  # fmt: skip
    interrupted = batcher.prepare(request)
    came = batcher.prepare(dataclasses.replace(request, seed=5))
    futures = []
    interrupted.progress = lambda done, *_: done == 3 and futures.append(batcher.submit(came))
    encode_text = pipe.backend.encode_text

    def encoding(ids):  # the job that came: its prompt is encoded after the 3rd step
        if interrupted.index == 3:
            interrupted.interrupt()
        return encode_text(ids)

    monkeypatch.setattr(pipe.backend, "encode_text", encoding)
    first = batcher.submit(interrupted)
    batcher.start()
    try:
        got = first.result(timeout=60)
        assert got.unet_calls == 3 and futures[0].result(timeout=60).unet_calls == 8
    finally:
        batcher.close()

    def interrupt_after_the_third(pipeline, i, t, tensors):
        pipeline._interrupt = i == 2
        return tensors

    reference = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    with intra_op_threads(ServeOptions.intra_op_threads):
        want = reference(
            "a cat", image, strength=0.8, num_inference_steps=10, guidance_scale=8.0,
            generator=torch.Generator().manual_seed(4), output_type="np",
            callback_on_step_end=interrupt_after_the_third,
        )  # fmt: skip
    assert want.unet_calls == 3
    np.testing.assert_array_equal(got.array, want.images[0])


def test_a_job_interrupted_before_it_starts_answers_no_images(pipe, image):
    """Interrupted while it waits, a job answers at once with no images and no UNet call
    (A1111 makes no image of a batch it has not started); the others run."""
    batcher = StepBatcher(pipe, ServeOptions(max_rows=2), start=False)
    request = Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4)
    first, waiting = batcher.prepare(request), batcher.prepare(request)  # 2 rows each
    futures = [batcher.submit(job) for job in (first, waiting)]
    waiting.interrupt()
    batcher.start()
    try:
        skipped, ran = futures[1].result(timeout=30), futures[0].result(timeout=30)
    finally:
        batcher.close()
    assert (skipped.images, skipped.arrays, skipped.unet_calls) == ([], [], 0)
    assert len(ran.images) == 1 and ran.unet_calls == 2 and waiting.timesteps is None


def test_an_interrupt_while_the_worker_sorts_out_finished_jobs_loses_none(pipe, image, monkeypatch):
    """An interrupt that lands between the worker's reading which jobs are done and its
    keeping the others (simulated: the job reads not done, then is interrupted), as another
    job finishes, is served at the next iteration: the job answers with its 2 steps, it is
    not dropped unanswered."""
    batcher = StepBatcher(pipe, start=False)
    job = batcher.prepare(Img2ImgRequest(image=image, strength=1.0, num_inference_steps=4))
    two_steps = batcher.prepare(Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4))
    done = Job.done

    def landing(self):  # the first read after the 2nd step: not done, then interrupted
        if self is job and self.index == 2 and not self.interrupted:
            self.interrupt()
            return False
        return done.fget(self)

    monkeypatch.setattr(Job, "done", property(landing))
    futures = [batcher.submit(job), batcher.submit(two_steps)]
    batcher.start()
    try:
        assert [future.result(timeout=30).unet_calls for future in futures] == [2, 2]
    finally:
        batcher.close()


def test_a_job_interrupted_as_it_starts_answers_no_images(pipe, image, monkeypatch):
    """Interrupted while the worker encodes its prompt (admitted, before its first step),
    a job answers no images, as a waiting one does: no step, no decode."""
    batcher = StepBatcher(pipe, start=False)
    job = batcher.prepare(Img2ImgRequest(image=image, strength=0.5, num_inference_steps=4))
    encode_text, decoded = pipe.backend.encode_text, []

    def encoding(ids):
        job.interrupt()
        return encode_text(ids)

    monkeypatch.setattr(pipe.backend, "encode_text", encoding)
    monkeypatch.setattr(pipe.backend, "decode_latents", decoded.append)
    future = batcher.submit(job)
    batcher.start()
    try:
        result = future.result(timeout=30)
    finally:
        batcher.close()
    assert (result.images, result.unet_calls, decoded) == ([], 0, [])
    assert job.admitted and job.timesteps is not None  # it had started
