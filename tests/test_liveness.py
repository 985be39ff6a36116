"""The batching worker's liveness: an iteration that fails where nothing expected it fails
its jobs and the worker goes on; where the device then fails to synchronise too (a CUDA
error that sticks), the worker stops, new requests get 503 and every liveness check says
so, for an orchestrator to restart the server."""

from __future__ import annotations

import base64

import httpx
import pytest
from conftest import noise_picture, png_bytes, serving

from sdtrt.errors import ServerBusyError
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest
from sdtrt.serve.options import ServeOptions

SMALL = Img2ImgRequest(image=noise_picture(0), strength=0.5, num_inference_steps=4)


def _failing_once(batcher):
    """The batcher's next group choice fails once (an unforeseen failure in an iteration)."""
    choose, failures = batcher._next_group, []

    def failing():
        if not failures:
            failures.append(1)
            raise RuntimeError("unforeseen")
        return choose()

    batcher._next_group = failing


def test_a_failed_iteration_fails_its_jobs_and_the_worker_goes_on(pipe):
    """The failed job takes no further step (its rows are in no UNet call after); the next
    job runs its 2 steps alone."""
    batcher = StepBatcher(pipe, start=False)
    rows: list[int] = []
    batcher.stats.on_unet_call.append(rows.append)
    _failing_once(batcher)
    failed = batcher.submit(batcher.prepare(SMALL))
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="unforeseen"):
            failed.result(timeout=30)
        assert batcher.submit(batcher.prepare(SMALL)).result(timeout=30).unet_calls == 2
        assert batcher.alive and rows == [2, 2] and batcher.idle
    finally:
        batcher.close()


def test_a_device_that_fails_then_stops_the_worker_and_liveness_says_so(pipe, monkeypatch):
    """The failed request gets 500; the worker stops: the next one 503, /health 503,
    /v2/health/live 400 (the protocol's false), gRPC's ServerLive false."""

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with serving(pipe, ServeOptions(grpc_port=0)) as running:
        batcher = running.batcher
        _failing_once(batcher)
        monkeypatch.setattr(batcher.backend, "synchronize", sticky)
        body = {"image": base64.b64encode(png_bytes(noise_picture(0))).decode(),
                "strength": 0.5, "num_inference_steps": 4}  # fmt: skip
        failed = httpx.post(f"{running.url}/v1/img2img", json=body, timeout=30)
        assert failed.status_code == 500 and "unforeseen" in failed.json()["error"]
        batcher._thread.join(timeout=30)
        assert not batcher.alive
        with pytest.raises(ServerBusyError, match="stopped"):
            batcher.submit(batcher.prepare(SMALL))
        refused = httpx.post(f"{running.url}/v1/img2img", json=body, timeout=30)
        assert refused.status_code == 503 and "stopped" in refused.json()["error"]
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "stopped"
        live = httpx.get(f"{running.url}/v2/health/live")
        assert live.status_code == 400 and live.json() == {"live": False}
        tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
        assert not tg.InferenceServerClient(running.grpc).is_server_live()
