"""The Open Inference Protocol over gRPC (``sdtrt serve --grpc-port``): NVIDIA's
tritonclient.grpc calls it and gets ``/v1``'s pixels; typed contents read as raw ones; what
it cannot read, and every failure, is a gRPC status with /v1's message; a cancelled call
cancels its job."""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import PIL.Image
import pytest
from conftest import free_port, noise_picture, serving, v1_images

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.kserve import ProtocolError, img2img_values
from sdtrt.serve.options import ServeOptions

grpc = pytest.importorskip("grpc", reason="pip install 'sdtrt[grpc]'")
pytest.importorskip("grpc_tools", reason="pip install 'sdtrt[grpc]'")
from sdtrt.serve.grpc_api import SERVICE, messages, read_infer  # noqa: E402

KEY = {"authorization": "Bearer secret"}
SMALL = {"num_inference_steps": 4, "strength": 0.5, "seed": 3}


@pytest.fixture(scope="module")
def image():
    return noise_picture(2)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, ServeOptions(api_key="secret", grpc_port=0, max_body_mb=0.05)) as running:
        yield running


def _call(server, name, request, metadata=(("authorization", "Bearer secret"),)):
    """One call of the service by its own messages (no client library)."""
    m = messages()
    answered = {"ModelInfer": "ModelInferResponse", "ModelReady": "ModelReadyResponse"}[name]
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=m[answered].FromString,
        )
        return call(request, metadata=metadata, timeout=60)


def test_health_checks_and_reflection(server):
    """gRPC's health protocol (Kubernetes' grpc probes): the server live, the inference
    service ready, another service NOT_FOUND; server reflection lists and describes the
    service (what grpcurl reads)."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(service="img2img"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, "grpc.health.v1.Health"} <= set(database.get_services())
        service = DescriptorPool(database).FindServiceByName(SERVICE)
        assert [m.name for m in service.methods] == [
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelStreamInfer",
        ]  # fmt: skip
        streamed = service.methods_by_name["ModelStreamInfer"]
        assert streamed.client_streaming and streamed.server_streaming


def _typed_request(image, strength):
    """prompt, image and strength in typed contents; the rest as parameters."""
    m = messages()
    request = m["ModelInferRequest"](model_name="img2img", id="typed")
    prompt = request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    prompt.contents.bytes_contents.append(b"a fox")
    pixels = np.asarray(image)
    picture = request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
    picture.contents.uint_contents.extend(pixels.reshape(-1).tolist())
    number = request.inputs.add(name="strength", datatype="FP32", shape=[1])
    number.contents.fp32_contents.append(strength)
    request.parameters["num_inference_steps"].int64_param = 10
    request.parameters["seed"].int64_param = 5
    return request


def test_tritonclient_grpc_gets_the_pixels_of_v1(server, image):
    """NVIDIA's client, in this process (its copy of the protocol's messages and ours live
    in two descriptor pools): raw tensors in and out, the id and job figures back."""
    tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    (want,) = v1_images(server, image, {"prompt": "a bird", **SMALL})
    client = tg.InferenceServerClient(server.grpc)
    prompt = tg.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a bird"], dtype=object))
    pixels = np.asarray(image)
    picture = tg.InferInput("image", list(pixels.shape), "UINT8")
    picture.set_data_from_numpy(pixels)
    result = client.infer(
        "img2img", [prompt, picture], request_id="r-7", headers=KEY, parameters=SMALL,
        outputs=[tg.InferRequestedOutput("image")],
    )  # fmt: skip
    got = result.as_numpy("image")
    assert got.shape == (1, 32, 48, 3) and np.array_equal(got[0], want)
    response = result.get_response()
    assert response.id == "r-7" and response.model_name == "img2img"
    assert response.parameters["seed"].int64_param == 3
    assert response.parameters["unet_calls"].int64_param == 2


def test_health_and_metadata_follow_the_protocol(server):
    tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("img2img") and client.is_model_ready("img2img", "1")
    assert client.get_server_metadata().name == "sdtrt"
    meta = client.get_model_metadata("img2img", headers=KEY)
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["image"] == ("UINT8", [-1, -1, 3]) and inputs["prompt"] == ("BYTES", [-1])
    assert inputs["seed"] == ("INT64", [1])
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("image", [-1, -1, -1, 3])]
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("img2img")  # no API key
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("sd15", headers=KEY)
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    assert "this server has img2img, version 1" in refused.value.message()


def test_typed_contents_read_as_raw_ones_and_fp32_as_its_decimal(server, image):
    """Typed contents (uint_contents pixels, bytes_contents text, fp32_contents 0.7): the
    same image as /v1's with 0.7, whose 10 steps run 7 UNet calls (not 6)."""
    (want,) = v1_images(
        server, image, {"prompt": "a fox", "num_inference_steps": 10, "strength": 0.7, "seed": 5}
    )
    response = _call(server, "ModelInfer", _typed_request(image, 0.7))
    assert response.id == "typed" and response.parameters["unet_calls"].int64_param == 7
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("image", "UINT8", [1, 32, 48, 3])
    got = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(32, 48, 3)
    assert np.array_equal(got, want)


def _refused(server, request, metadata=(("authorization", "Bearer secret"),)):
    with pytest.raises(grpc.RpcError) as refused:
        _call(server, "ModelInfer", request, metadata)
    return refused.value.code(), refused.value.details()


def test_failures_are_grpc_statuses_with_the_v1_message(server, image):
    m = messages()
    bad = _typed_request(image, 1.5)
    assert _refused(server, bad) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "strength must be in (0, 1], got 1.5",
    )
    code, details = _refused(server, _typed_request(image, 0.5), metadata=())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
    other = _typed_request(image, 0.5)
    other.model_name = "sd15"
    assert _refused(server, other)[0] == grpc.StatusCode.NOT_FOUND
    late = _typed_request(image, 0.5)
    late.parameters["timeout"].int64_param = 1  # Triton's schedule policy: microseconds
    assert _refused(server, late) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the request passed its deadline",
    )
    urgent = _typed_request(image, 0.5)
    urgent.parameters["priority"].int64_param = 1  # Triton's; this server has no levels
    code, details = _refused(server, urgent)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no priority levels" in details
    # Over --max-body-mb (0.05 MB here): gRPC's own limit on a message it receives.
    big = m["ModelInferRequest"](model_name="img2img")
    big.inputs.add(name="image", datatype="UINT8", shape=[160, 160, 3])
    big.raw_input_contents.append(bytes(160 * 160 * 3))
    assert _refused(server, big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_cancelled_call_cancels_its_job(server, image):
    """A call cancelled mid-way (the client gone) cancels its job, which the batcher
    drops at its next step."""
    m = messages()
    request = _typed_request(image, 1.0)
    request.parameters["num_inference_steps"].int64_param = 1000
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )
        future = call.future(request, metadata=tuple(KEY.items()))
        deadline = time.monotonic() + 30
        while not server.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.batcher.active, "the job never started"
        (job,) = server.batcher.active
        future.cancel()
        while server.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
    assert future.cancelled() and job.cancelled
    assert not server.batcher.active and job.index < len(job.timesteps)  # dropped mid-way


def _stream_inputs(tg, image, prompt):
    text = tg.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    pixels = np.asarray(image)
    picture = tg.InferInput("image", list(pixels.shape), "UINT8")
    picture.set_data_from_numpy(pixels)
    return [text, picture]


def test_tritonclient_streams_requests_and_gets_each_answer(server, image):
    """tritonclient's stream (Triton's ModelStreamInfer): three requests on one stream, each
    answered on it by its id: two with /v1's pixels for their seeds, one with another
    model's name with the message ModelInfer's status carries; closing the stream waits
    for them."""
    tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    answers = queue.Queue()
    client = tg.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=KEY)
    try:
        inputs = _stream_inputs(tg, image, "a bird")
        for seed in (3, 4):
            client.async_stream_infer("img2img", inputs, request_id=f"seed-{seed}",
                                      parameters={**SMALL, "seed": seed})  # fmt: skip
        client.async_stream_infer("sd15", inputs, request_id="other", parameters=SMALL)
    finally:
        client.stop_stream()  # the client's side closed: it waits for the answers
        client.close()
    got = [answers.get(timeout=60) for _ in range(3)]
    results = {result.get_response().id: result for result, error in got if error is None}
    (error,) = [error for _, error in got if error is not None]
    assert "unknown model 'sd15'" in error.message() and set(results) == {"seed-3", "seed-4"}
    for seed in (3, 4):  # the two may share UNet calls, /v1's ran alone: a level at most
        (want,) = v1_images(server, image, {"prompt": "a bird", **SMALL, "seed": seed})
        difference = np.abs(results[f"seed-{seed}"].as_numpy("image")[0].astype(int) - want)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert answers.empty()


def test_a_stream_with_preview_every_answers_as_a_decoupled_model(server, image):
    """preview_every 2 on 8 steps: three previews (after steps 2, 4 and 6: the picture's
    size, the step and steps as parameters, triton_final_response false), then the result
    (/v1's pixels, triton_final_response true). ModelInfer, with one answer, refuses it, as
    /v2 over HTTP does."""
    tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    from tritonclient.utils import InferenceServerException

    fields = {"num_inference_steps": 8, "strength": 1.0, "seed": 9}
    answers = queue.Queue()
    client = tg.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=KEY)
    try:
        client.async_stream_infer("img2img", _stream_inputs(tg, image, "a fox"), request_id="p",
                                  parameters={**fields, "preview_every": 2})  # fmt: skip
    finally:
        client.stop_stream()
    got = [answers.get(timeout=60) for _ in range(4)]
    assert answers.empty() and all(error is None for _, error in got)
    responses = [result.get_response() for result, _ in got]
    assert [r.id for r in responses] == ["p"] * 4
    flags = [r.parameters["triton_final_response"].bool_param for r in responses]
    assert flags == [False, False, False, True]
    steps = [(r.parameters["step"].int64_param, r.parameters["steps"].int64_param)
             for r in responses[:3]]  # fmt: skip
    assert steps == [(2, 8), (4, 8), (6, 8)]
    previews = [result.as_numpy("image") for result, _ in got[:3]]
    assert all(p.shape == (1, 32, 48, 3) and p.dtype == np.uint8 for p in previews)
    assert not np.array_equal(previews[0], previews[2])  # two steps' estimates
    (want,) = v1_images(server, image, {"prompt": "a fox", **fields})
    assert np.array_equal(got[3][0].as_numpy("image")[0], want)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("img2img", _stream_inputs(tg, image, "a fox"), headers=KEY,
                     parameters={**fields, "preview_every": 2})  # fmt: skip
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "previews come on gRPC's ModelStreamInfer" in refused.value.message()
    client.close()
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a fox"]}],
            "parameters": {"preview_every": 2}}  # fmt: skip
    answer = httpx.post(f"{server.url}/v2/models/img2img/infer", json=body,
                        headers={"Authorization": "Bearer secret"}, timeout=30)  # fmt: skip
    assert answer.status_code == 400 and "ModelStreamInfer" in answer.json()["error"]


def test_a_stopping_server_answers_a_streams_requests_then_ends_it(pipe, image):
    """A stream left open by its client, with a request running, when the server stops:
    the request is answered, then the stream ends (OK) at once: it does not hold the stop
    to its 30 s grace."""
    m = messages()
    request = _typed_request(image, 1.0)
    request.parameters["num_inference_steps"].int64_param = 40
    held, server = threading.Event(), contextlib.ExitStack()

    def requests():  # one request, then the client's side stays open
        yield request
        held.wait(timeout=60)

    with server:
        running = server.enter_context(serving(pipe, ServeOptions(grpc_port=0, drain_timeout=30)))
        with grpc.insecure_channel(running.grpc) as channel:
            call = channel.stream_stream(
                f"/{SERVICE}/ModelStreamInfer",
                request_serializer=m["ModelInferRequest"].SerializeToString,
                response_deserializer=m["ModelStreamInferResponse"].FromString,
            )
            responses = call(requests(), timeout=60)
            deadline = time.monotonic() + 30
            while not running.batcher.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert running.batcher.active, "the request never started"
            started = time.monotonic()
            server.close()  # the server stops
            assert time.monotonic() - started < 15  # not held to the grace's 30 s
            (answer,) = list(responses)
            held.set()
    assert responses.code() == grpc.StatusCode.OK and not answer.error_message
    assert answer.infer_response.parameters["unet_calls"].int64_param == 40


def test_a_cancelled_stream_cancels_its_jobs(server, image):
    """A stream the client cancels with a request of 1000 steps running: its job is
    cancelled, dropped at its next step."""
    tg = pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    client = tg.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: None, headers=KEY)
    try:
        client.async_stream_infer("img2img", _stream_inputs(tg, image, "a cat"),
                                  parameters={**SMALL, "num_inference_steps": 1000,
                                              "strength": 1.0})  # fmt: skip
        deadline = time.monotonic() + 30
        while not server.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.batcher.active, "the job never started"
        (job,) = server.batcher.active
        client.stop_stream(cancel_requests=True)
        while server.batcher.active and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.close()
    assert job.cancelled and not server.batcher.active and job.index < len(job.timesteps)


def _read(request, max_pixels=2048 * 2048):
    with pytest.raises(ProtocolError) as refused:
        read_infer(request, max_pixels, lambda data: None)
    return refused.value.status, refused.value.message


def test_what_the_protocol_cannot_read_is_refused_naming_it():
    m = messages()
    request = m["ModelInferRequest"]()
    request.inputs.add(name="seed", datatype="INT64", shape=[1])
    assert _read(request) == (400, "input seed: 0 elements for shape [1]")
    request.raw_input_contents.extend([b"\x01" * 8, b""])
    assert _read(request) == (400, "raw_input_contents has 2 entries for 1 inputs")
    del request.raw_input_contents[1]
    request.inputs[0].contents.int64_contents.append(1)
    assert _read(request) == (400, "input seed: contents and raw_input_contents together")
    half = m["ModelInferRequest"]()
    half.inputs.add(name="strength", datatype="FP16", shape=[1]).contents.fp32_contents.append(1)
    assert _read(half) == (400, "input strength: FP16 comes in raw_input_contents")
    twice = m["ModelInferRequest"]()
    for _ in range(2):
        twice.inputs.add(name="seed", datatype="INT64", shape=[1]).contents.int64_contents.append(1)
    assert _read(twice) == (400, "input 'seed' is given twice")
    output = m["ModelInferRequest"]()
    output.outputs.add(name="latents")
    assert _read(output) == (400, "unknown output 'latents': this model's one output is image")
    wide = m["ModelInferRequest"]()
    wide.inputs.add(name="image", datatype="UINT8", shape=[65, 64, 3])
    wide.raw_input_contents.append(bytes(65 * 64 * 3))
    assert _read(wide, 64 * 64)[0] == 422
    # FP16 raw, read as its shortest decimal; the parameters' oneof values.
    raw = m["ModelInferRequest"]()
    raw.inputs.add(name="strength", datatype="FP16", shape=[1])
    raw.raw_input_contents.append(np.array([0.3], np.float16).tobytes())
    raw.parameters["guidance_scale"].double_param = 3.5
    raw.parameters["scheduler"].string_param = "euler"
    read = read_infer(raw, 64, lambda data: None)
    assert read.values == {"strength": 0.3, "guidance_scale": 3.5, "scheduler": "euler"}
    assert read.load is None and read.timeout is None


def test_the_timeout_parameter_is_microseconds_as_triton_says():
    """Triton's schedule-policy ``timeout`` (tritonclient's ``infer(timeout=)``), over
    HTTP and gRPC alike: microseconds, 0 for the server's own."""
    assert img2img_values({}, {"timeout": 2_500_000}) == ({}, 2.5, None)
    assert img2img_values({}, {"timeout": 0}) == ({}, None, None)
    for bad in (1.5, -1, "5", True):
        with pytest.raises(ProtocolError, match="microseconds"):
            img2img_values({}, {"timeout": bad})


def test_grpc_port_options_and_command_line():
    from sdtrt.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--grpc-port", "8001"])
    assert args.grpc_port == 8001 and ServeOptions().grpc_port is None
    with pytest.raises(InvalidInputError, match="grpc_port and port are both 8000"):
        ServeOptions(grpc_port=8000)
    with pytest.raises(InvalidInputError, match=r"grpc_port must be in \[0, 65535\]"):
        ServeOptions(grpc_port=70000)
    assert main(["serve", "--ray", "--grpc-port", "8001"]) == 2


def test_a_grpc_port_in_use_is_said_before_the_model_loads():
    from sdtrt.serve.server import run

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(InvalidInputError, match="choose another --grpc-port"):
            run("no-such-model", "torch", options=ServeOptions(port=0, grpc_port=port))
        assert time.monotonic() - started < 5


def test_the_readme_client_runs_against_a_server(tiny, image, tmp_path, monkeypatch):
    """README's tritonclient.grpc example, as written but for the address and picture."""
    pytest.importorskip("tritonclient.grpc", reason="pip install tritonclient")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "grpcclient" in b]
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    monkeypatch.chdir(tmp_path)
    image.save("photo.png")
    with serving(pipe, ServeOptions(grpc_port=0, steps=4)) as running:
        code = textwrap.dedent(block).replace("localhost:8001", running.grpc)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert PIL.Image.open("out.png").size == (48, 32)


def test_a_draining_server_is_not_ready_and_takes_no_new_calls(tiny, image):
    """What a stop signal does (DrainingServer.handle_exit): ServerReady turns false and a
    new call is UNAVAILABLE, as /ready turns 503."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    with serving(pipe, ServeOptions(grpc_port=0)) as running:
        ready = messages()["ModelReadyRequest"](name="img2img")
        assert _call(running, "ModelReady", ready).ready
        running.app.state.sdtrt["draining"] = True
        running.batcher.drain()
        assert not _call(running, "ModelReady", ready).ready
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(running.grpc) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            statuses = [check(health_pb2.HealthCheckRequest(service=s)).status
                        for s in ("", SERVICE)]  # fmt: skip
        answer = health_pb2.HealthCheckResponse
        assert statuses == [answer.SERVING, answer.NOT_SERVING]  # live, not ready
        code, details = _refused(running, _typed_request(image, 0.5))
        assert code == grpc.StatusCode.UNAVAILABLE and details
        assert httpx.get(f"{running.url}/ready").status_code == 503


def test_health_watch_streams_each_change(pipe):
    """The health protocol's Watch (gRPC clients' own health checking): SERVING at once for
    the server and the inference service; when the server starts draining, the service's
    stream says NOT_SERVING (within a read or two); another service gets SERVICE_UNKNOWN on
    a call kept open. When the server stops, the watches end (OK): they do not hold the
    stop to its 30 s grace."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answer = health_pb2.HealthCheckResponse
    server = contextlib.ExitStack()
    with server:
        running = server.enter_context(serving(pipe, ServeOptions(grpc_port=0, drain_timeout=30)))
        with grpc.insecure_channel(running.grpc) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch
            streams = {s: watch(health_pb2.HealthCheckRequest(service=s), timeout=60)
                       for s in ("", SERVICE, "img2img")}  # fmt: skip
            firsts = {s: next(stream).status for s, stream in streams.items()}
            assert firsts == {"": answer.SERVING, SERVICE: answer.SERVING,
                              "img2img": answer.SERVICE_UNKNOWN}  # fmt: skip
            running.batcher.drain()
            assert next(streams[SERVICE]).status == answer.NOT_SERVING
            started = time.monotonic()
            server.close()  # the server stops, the watches still open
            assert time.monotonic() - started < 15  # not held to the grace's 30 s
            for stream in streams.values():
                list(stream)  # ends, OK (an RpcError otherwise)
                assert stream.code() == grpc.StatusCode.OK


def test_sdtrt_serve_answers_grpc_and_drains_its_calls_on_sigterm(image):
    """The command line's --grpc-port: a call in flight when SIGTERM comes is answered,
    then the process exits 0."""
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "sdtrt.cli", "serve", "--port", str(port)]
    command += ["--grpc-port", str(grpc_port), "--drain-timeout", "60"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = SimpleNamespace(grpc=f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 120
        ready = messages()["ModelReadyRequest"](name="img2img")
        while True:
            try:
                if _call(running, "ModelReady", ready).ready:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "never ready"
            time.sleep(0.2)
        request = _typed_request(image, 1.0)
        request.parameters["num_inference_steps"].int64_param = 300  # seconds of work
        answers = []
        client = threading.Thread(
            target=lambda: answers.append(_call(running, "ModelInfer", request))
        )
        client.start()
        time.sleep(0.5)  # in flight
        process.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert process.wait(timeout=120) == 0
        (answer,) = answers
        assert answer.parameters["unet_calls"].int64_param == 300
    finally:
        if process.poll() is None:
            process.kill()
        with process:
            log = process.stdout.read() if process.stdout else ""
    assert f"serving gRPC on 127.0.0.1:{grpc_port}" in log and "draining" in log


def test_without_the_grpc_extra_the_server_says_how_to_install_it(monkeypatch):
    from sdtrt.errors import BackendUnavailableError
    from sdtrt.serve import grpc_api

    monkeypatch.setitem(sys.modules, "grpc_tools", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'sdtrt\[grpc\]'"):
        grpc_api.grpc_modules()
