"""`sdtrt serve --ray`: the same app and batcher as Ray Serve replicas behind Ray's HTTP
proxy, on a local Ray cluster (CPU, tiny model): answers equal the pipeline's, both
replicas serve, and a replica killed under load is replaced while the others answer."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import io
import os
import signal
import time

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import free_port, png_bytes

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.options import ServeOptions
from sdtrt.source import ModelSource
from sdtrt.train.shapes import Scene

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'sdtrt[ray]')",
)
INPUT = Scene("red", "circle", "blue").draw()  # 64x64: the tiny model's home size
BODY = {
    "prompt": "a yellow square on a green background",
    "image": base64.b64encode(png_bytes(INPUT)).decode(),
    "num_inference_steps": 8,
    "strength": 0.75,
}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from sdtrt.serve import ray_app

    port = free_port()
    ray_app.start("127.0.0.1", port, address=None, num_cpus=2)
    application = ray_app.application(
        ModelSource("tiny"), "torch", {}, "lms", ServeOptions(), replicas=2
    )
    serve.run(application, name="sdtrt", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait_for_replicas(url, 2, timeout=180)
    yield url
    serve.shutdown()
    ray.shutdown()


def _replica_pids(url: str, tries: int = 40) -> set[int]:
    pids = set()
    for _ in range(tries):
        answer = httpx.get(f"{url}/health", timeout=10)
        if answer.status_code == 200:
            pids.add(answer.json()["pid"])
    return pids


def _wait_for_replicas(url: str, count: int, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ready = [httpx.get(f"{url}/ready", timeout=10).status_code for _ in range(8)]
            pids = _replica_pids(url, 20)
            if len(pids) >= count and all(code == 200 for code in ready):
                return pids
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{count} ready replicas were not there within {timeout} s")


def _image(answer: httpx.Response) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(answer.content)), np.int16)


def test_two_replicas_answer_concurrent_requests_as_the_pipeline(cluster, tiny):
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    seeds = list(range(6))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda seed: httpx.post(
                    f"{cluster}/v1/img2img", json={**BODY, "seed": seed}, timeout=120
                ),
                seeds,
            )
        )
    ids = [answer.headers.get_list("x-request-id") for answer in answers]
    assert all(len(one) == 1 for one in ids) and len({one[0] for one in ids}) == 6, ids
    for seed, answer in zip(seeds, answers, strict=True):
        assert answer.status_code == 200, answer.text
        want = pipe(
            BODY["prompt"],
            INPUT,
            strength=BODY["strength"],
            num_inference_steps=BODY["num_inference_steps"],
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        # batched with the others on its replica: within one 8-bit level of the pipeline
        assert np.abs(_image(answer) - np.round(want * 255)).max() <= 1
    assert len(_replica_pids(cluster)) == 2
    # The Open Inference Protocol through Ray's proxy too: the last seed's image.
    text = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [BODY["prompt"]]}
    fields = {k: v for k, v in BODY.items() if k not in ("prompt", "image")}
    pixels = np.asarray(INPUT)
    image = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
             "data": pixels.reshape(-1).tolist()}  # fmt: skip
    request = {"inputs": [text, image], "parameters": {**fields, "seed": seeds[-1]}}
    answer = httpx.post(f"{cluster}/v2/models/img2img/infer", json=request, timeout=120)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    got = np.asarray(output["data"], np.uint8).reshape(output["shape"])[0]
    assert np.abs(got - np.round(want * 255)).max() <= 1


def test_a_stream_of_progress_passes_through_rays_proxy(cluster):
    """/v1/img2img/stream's server-sent events, each step as it comes, through the proxy."""
    events = []
    with httpx.stream("POST", f"{cluster}/v1/img2img/stream", json={**BODY, "seed": 5},
                      timeout=120) as answer:  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [
            line[len("event: ") :] for line in answer.iter_lines() if line.startswith("event")
        ]
    assert events == ["queued"] + ["step"] * 6 + ["result"]  # int(8 x 0.75) UNet calls


def test_a_replica_killed_under_load_loses_only_its_requests_and_is_replaced(cluster):
    """Eight slow requests in flight on both replicas (400 steps each, about 14 s batched
    four to a replica here), then one replica's process is killed: the requests it held
    fail at once with Ray's 500 (Ray Serve does not retry them; a client may: the same seed
    makes the same image), the other replica's all succeed, Ray starts a new replica and
    the endpoint answers again. Measured here: 4 lost, 4 served, replaced in 15 s."""
    before = _replica_pids(cluster)
    assert len(before) == 2
    victim = min(before)
    slow = {**BODY, "num_inference_steps": 400, "strength": 1.0}

    def post(seed: int) -> int:
        return httpx.post(
            f"{cluster}/v1/img2img", json={**slow, "seed": seed}, timeout=120
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = []
        for seed in range(8):
            futures.append(pool.submit(post, seed))
            # Ray's router picks by the replicas' queue lengths: sent all at once, it once put
            # seven on one replica; spaced, each pick sees the ones before it.
            time.sleep(0.1)
        time.sleep(1.5)  # all eight are in flight: each takes seconds
        assert not any(f.done() for f in futures)
        os.kill(victim, signal.SIGKILL)
        statuses = [f.result() for f in futures]
    lost = statuses.count(500)
    assert set(statuses) <= {200, 500}, statuses
    assert 1 <= lost <= 7, statuses  # the router spreads them over both replicas
    after = _wait_for_replicas(cluster, 2, timeout=240)
    assert victim not in after and len(after) == 2  # a new process took its place
    answer = httpx.post(f"{cluster}/v1/img2img", json={**BODY, "seed": 1}, timeout=120)
    assert answer.status_code == 200


def test_the_health_check_fails_a_replica_whose_batcher_stopped_or_warmup_failed(tiny):
    """What Ray's periodic check_health asks; an answer other than None makes Ray restart
    the replica (Ray's contract: an exception from check_health)."""
    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.ray_app import health_problem

    batcher = StepBatcher(Img2ImgPipeline.from_components(tiny, "torch"), ServeOptions())
    try:
        assert health_problem(batcher, {}) is None
        assert health_problem(batcher, {"warmup_failed": True}) == "the warm-up failed"
    finally:
        batcher.close()
    assert health_problem(batcher, {}) == "the batcher's worker thread has stopped"


def test_the_serve_config_file_builds_the_application_it_describes():
    """serve/ray-serve.yaml's args, as `serve run`/`serve deploy` pass them to app_builder:
    autoscaling bounds, one GPU per replica, the backend and typed serve options (Ray's
    Application has no public accessors: its bound deployment is read)."""
    from pathlib import Path

    import yaml

    from sdtrt.serve import ray_app

    config = yaml.safe_load((Path(ray_app.__file__).parent / "ray-serve.yaml").read_text())
    deployment = ray_app.app_builder(config["applications"][0]["args"])._bound_deployment
    model, backend, scheduler, options = deployment.init_args
    assert model["model"] == "/models/sd15-onnx" and scheduler == "lms"
    assert backend == {"backend": "tensorrt", "precision": "fp16"}
    assert options["max_queue"] == 64 and options["timeout"] == 300.0
    assert options["warmup_sizes"] == ((512, 512),)
    assert deployment.ray_actor_options["num_gpus"] == 1.0
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    fixed = ray_app.app_builder({"model": "tiny", "replicas": "3"})._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    for given, threads in (("auto", None), (None, None), ("4", 4), (2, 2)):
        built = ray_app.app_builder({"model": "tiny", "intra_op_threads": given})
        assert built._bound_deployment.init_args[3]["intra_op_threads"] == threads
    with pytest.raises(ValueError, match=r"max_rows must be int \| None, got 'many'"):
        ray_app.app_builder({"model": "tiny", "max_rows": "many"})
    for given in ("512x512,768x512", [[512, 512], [768, 512]]):  # a string, or YAML's lists
        built = ray_app.app_builder({"model": "tiny", "warmup_sizes": given})
        assert built._bound_deployment.init_args[3]["warmup_sizes"] == ((512, 512), (768, 512))
    engines = ray_app.app_builder({"model": "/m", "backend": "tensorrt", "engine_dir": "/e"})
    assert engines._bound_deployment.init_args[1] == {"backend": "tensorrt", "engine_dir": "/e"}
    for given, skip in (("2", 2), (1, 1), (None, None)):  # as `sdtrt serve --clip-skip`
        built = ray_app.app_builder({"model": "/m", "variant": "fp16", "clip_skip": given})
        model = built._bound_deployment.init_args[0]
        assert (model["model"], model["variant"], model["clip_skip"]) == ("/m", "fp16", skip)
    for given, loras in (("/l.safetensors", [("/l.safetensors", 1.0)]), (None, [])):
        built = ray_app.app_builder({"model": "/m", "lora": given})
        assert list(built._bound_deployment.init_args[0]["loras"]) == loras
    built = ray_app.app_builder(
        {"model": "/m", "vae": "/v.safetensors", "embedding": "/e/EasyNegative.safetensors"}
    )
    assert built._bound_deployment.init_args[0]["vae"] == "/v.safetensors"
    assert list(built._bound_deployment.init_args[0]["embeddings"]) == [
        ("/e/EasyNegative.safetensors", "EasyNegative")
    ]
    built = ray_app.app_builder({"model": "/m", "lora": ["/a.safetensors:0.5", "/b.safetensors"]})
    assert list(built._bound_deployment.init_args[0]["loras"]) == [
        ("/a.safetensors", 0.5),
        ("/b.safetensors", 1.0),
    ]
    keyed = ray_app.app_builder({"model": "tiny", "api_key": "none"})  # a key, however named
    assert keyed._bound_deployment.init_args[3]["api_key"] == "none"
    with pytest.raises(
        ValueError, match=r"unknown sdtrt serve argument\(s\) \['modle'\]; known: .*'model'"
    ):
        ray_app.app_builder({"modle": "tiny"})
