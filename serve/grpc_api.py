"""The Open Inference Protocol over gRPC (KServe v2's gRPC API; NVIDIA Triton serves it on
port 8001): ``sdtrt serve --grpc-port 8001`` answers a Triton or KServe gRPC client (NVIDIA's
``tritonclient.grpc``, which the tests run) with the model, inputs and output of ``/v2``
over HTTP (serve/kserve.py), through the same request handling and batcher
(serve/handling.py).

Tensors come in ``raw_input_contents`` (what tritonclient sends: numbers little-endian,
BYTES elements length-prefixed) or in typed ``contents``; parameters are the protocol's
``InferParameter`` values (a float as Triton's ``double_param``). The output ``image`` comes
back in ``raw_output_contents``. Failures are gRPC statuses: a bad request
INVALID_ARGUMENT, no API key UNAUTHENTICATED, another model NOT_FOUND, a full queue
RESOURCE_EXHAUSTED, a server draining UNAVAILABLE, a request past its deadline
DEADLINE_EXCEEDED, a job that fails INTERNAL, each with the message ``/v1`` gives. A call
the client cancels, or whose gRPC deadline passes, cancels its job. The server runs on its
own thread and event loop beside uvicorn's. Triton's ``ModelStreamInfer`` answers each
request sent on a stream on it, as it finishes, a failure in its ``error_message``; one
with ``preview_every`` first gets its previews, as a decoupled model's responses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.errors import BackendUnavailableError
from sdtrt.serve import kserve
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.fields import TYPES
from sdtrt.serve.handling import (
    WRONG_KEY,
    BadRequest,
    decode_image,
    field_value,
    key_given,
    off_loop,
    request_id_of,
    run_job,
)
from sdtrt.serve.jobs import JobResult, ProgressHook
from sdtrt.serve.metrics import Metrics
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.streaming import every_nth, preview_every

logger = logging.getLogger(__name__)
PROTO = Path(__file__).with_name("inference.proto")
SERVICE = "inference.GRPCInferenceService"
# Each call: its request and response messages.
CALLS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}
# How often the health protocol's Watch reads the status it streams (seconds).
WATCH_EVERY = 0.25
# Typed contents: the field each datatype's elements come in (FP16 has none: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def grpc_modules() -> tuple[Any, Any]:
    """grpcio and grpcio-tools' protoc, or BackendUnavailableError saying how to install them
    (with the health and reflection services' packages)."""
    try:
        import grpc
        import grpc_health.v1.health  # noqa: F401
        import grpc_reflection.v1alpha.reflection  # noqa: F401
        from grpc_tools import protoc
    except ImportError:
        raise BackendUnavailableError(
            "serving gRPC (--grpc-port) needs grpcio, grpcio-tools, grpcio-health-checking and "
            "grpcio-reflection: pip install 'sdtrt[grpc]'"
        ) from None
    return grpc, protoc


@functools.cache
def _compiled() -> tuple[Any, dict[str, Any]]:
    """inference.proto compiled into a descriptor pool of its own (a client's copy of the
    same ``inference`` package, tritonclient's or KServe's, in the same process would
    clash in protobuf's default pool), with the health service's file (for reflection);
    the pool and the protocol's message classes by name."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_health.v1 import health_pb2

    _, protoc = grpc_modules()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "inference.pb"
        args = ["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc could not compile {PROTO} (its errors are above)")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    health = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(health)
    pool.Add(health)
    names = {name for pair in CALLS.values() for name in pair}
    names |= {"InferParameter", "ModelStreamInferResponse"}
    classes = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
        for name in names
    }
    return pool, classes


def messages() -> dict[str, Any]:
    """The protocol's message classes by name (``ModelInferRequest``...)."""
    return _compiled()[1]


def read_infer(
    request: Any, max_pixels: int, decode: Callable[[bytes], Any] = decode_image
) -> kserve.Inference:
    """A ModelInferRequest read as ``/v2`` reads its JSON form: the img2img fields, how to
    load the picture, the timeout. ProtocolError names what is wrong."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise kserve.ProtocolError(
            400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        datatype, shape = kserve.check_tensor(name, tensor.datatype, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise kserve.ProtocolError(
                    400, f"input {name}: contents and raw_input_contents together"
                )
            array = kserve.raw_tensor(name, datatype, shape, raw[index])
        else:
            array = _typed_tensor(name, datatype, shape, tensor.contents)
        if name in tensors:
            raise kserve.ProtocolError(400, f"input {name!r} is given twice")
        tensors[name] = array
    for output in request.outputs:
        if output.name != "image":
            raise kserve.ProtocolError(
                400, f"unknown output {output.name!r}: this model's one output is image"
            )
    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    values, timeout, priority = kserve.img2img_values(tensors, parameters)
    load = kserve.image_loader(tensors.get("image"), decode, max_pixels)
    return kserve.Inference(
        values, load, timeout, priority, binary=True, id=request.id or None,
        preview_every=parameters.get("preview_every"),
    )  # fmt: skip


def _typed_tensor(name: str, datatype: str, shape: list[int], contents: Any) -> np.ndarray:
    if datatype not in CONTENTS:
        raise kserve.ProtocolError(400, f"input {name}: {datatype} comes in raw_input_contents")
    values = getattr(contents, CONTENTS[datatype])
    if datatype == "BYTES":
        return kserve.bytes_tensor(name, list(values), shape)
    # Handed over as it is: numpy reads protobuf's repeated numbers at once (a 512x512
    # picture's: 0.8 ms; through a Python list, 32 ms).
    return kserve.typed_numbers(name, values, datatype, shape)


def parameter_value(parameter: Any) -> Any:
    """An InferParameter's value (None where none is set)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def infer_response(result: JobResult, model: str, request_id: str) -> Any:
    """The ModelInferResponse for a job's images: ``image`` UINT8 [N, H, W, 3], raw, and
    the job's seed, UNet calls and queue wait as parameters."""
    response = _image_response(kserve.pixels_of(result.images), model, request_id)
    seed = response.parameters["seed"]
    if result.seed < 2**63:
        seed.int64_param = result.seed
    else:  # seeds run to 2^64 - 1
        seed.uint64_param = result.seed
    response.parameters["unet_calls"].int64_param = result.unet_calls
    response.parameters["queue_wait_ms"].double_param = result.queue_wait_ms
    return response


def _image_response(pixels: np.ndarray, model: str, request_id: str) -> Any:
    """A ModelInferResponse whose output ``image`` is ``pixels`` (UINT8 [N, H, W, 3]), raw."""
    response = messages()["ModelInferResponse"](
        model_name=model, model_version=kserve.VERSION, id=request_id
    )
    response.outputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
    response.raw_output_contents.append(pixels.tobytes())
    return response


class InferenceService:
    """The protocol's calls over the batcher, as ``/v2`` answers them over HTTP."""

    def __init__(
        self,
        batcher: StepBatcher,
        options: ServeOptions,
        intake: Executor,
        metrics: Metrics,
        readiness: Callable[[], str],
    ) -> None:
        self.batcher, self.options, self.intake = batcher, options, intake
        self.metrics, self.readiness = metrics, readiness
        self.messages = messages()
        self.stopping = asyncio.Event()
        """Set when the server stops: health watches end and streams read no more requests
        (a stop waits for the calls in flight: open ones would hold it to its grace's end)."""

    def handlers(self) -> tuple[Any, Any]:
        """The service's calls, and gRPC's health service's ``Check``, for
        ``grpc.aio.Server.add_generic_rpc_handlers``."""
        from grpc_health.v1 import health, health_pb2

        grpc, _ = grpc_modules()
        calls = {}
        for call, (asked, answered) in CALLS.items():
            calls[call] = grpc.unary_unary_rpc_method_handler(
                getattr(self, call),
                request_deserializer=self.messages[asked].FromString,
                response_serializer=self.messages[answered].SerializeToString,
            )
        calls["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer,
            request_deserializer=self.messages["ModelInferRequest"].FromString,
            response_serializer=self.messages["ModelStreamInferResponse"].SerializeToString,
        )
        health_messages = {
            "request_deserializer": health_pb2.HealthCheckRequest.FromString,
            "response_serializer": health_pb2.HealthCheckResponse.SerializeToString,
        }
        checks = {
            "Check": grpc.unary_unary_rpc_method_handler(self.Check, **health_messages),
            "Watch": grpc.unary_stream_rpc_method_handler(self.Watch, **health_messages),
        }
        return (
            grpc.method_handlers_generic_handler(SERVICE, calls),
            grpc.method_handlers_generic_handler(health.SERVICE_NAME, checks),
        )

    async def Check(self, request: Any, context: Any) -> Any:
        """gRPC's health checking protocol (Kubernetes' grpc probes, grpc_health_probe):
        the server ("") is SERVING while its worker lives, as /v2/health/live; the
        inference service is SERVING when ready, NOT_SERVING while warming up or draining,
        as /v2/health/ready; another service NOT_FOUND."""
        from grpc_health.v1 import health_pb2

        status = self._health(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(
                _status(404),
                f"unknown service {request.service!r}: this server has '' and {SERVICE}",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The health protocol's stream (what gRPC clients' own health checking,
        ``healthCheckConfig``, calls): ``Check``'s status now, then each change of it (read
        every ``WATCH_EVERY`` seconds) until the client goes away or the server stops (a
        stop waits for the calls in flight: a watch would hold it to its grace's end);
        SERVICE_UNKNOWN for another service, the call kept open, as the protocol says."""
        from grpc_health.v1 import health_pb2

        told = None
        while not self.stopping.is_set():
            status = self._health(request.service)
            if status != told:
                yield health_pb2.HealthCheckResponse(status=status)
                told = status
            await asyncio.sleep(WATCH_EVERY)

    def _health(self, service: str) -> Any:
        """The health protocol's status of ``service`` ("": the server)."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse
        if service not in ("", SERVICE):
            return status.SERVICE_UNKNOWN
        serving = self.batcher.alive if service == "" else self.readiness() == "ready"
        return status.SERVING if serving else status.NOT_SERVING

    # The calls, by the protocol's names (handlers() finds them by those).
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.messages["ServerLiveResponse"](live=self.batcher.alive)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.messages["ServerReadyResponse"](ready=self.readiness() == "ready")

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        from sdtrt import __version__

        return self.messages["ServerMetadataResponse"](name="sdtrt", version=__version__)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._allowed(context, request.name, request.version, key=False)
        return self.messages["ModelReadyResponse"](ready=self.readiness() == "ready")

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._allowed(context, request.name, request.version, key=True)
        metadata = kserve.model_metadata(self.options.model_name, self.batcher.backend.name)
        return self.messages["ModelMetadataResponse"](**metadata)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            return await self._answer(request, context)
        except BadRequest as exc:
            await context.abort(_status(exc.status), exc.message)

    async def ModelStreamInfer(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        """Triton's streaming call: the requests sent on the stream run side by side, each
        answered on it once done (in the order they finish: a request's ``id`` names its
        answer), a failure in that answer's ``error_message`` (the stream goes on). A
        request with ``preview_every N`` is answered as a decoupled Triton model answers:
        first a response per preview (after every N-th step but the last: ``image`` as that
        step estimates it finished, the ``step`` and ``steps`` parameters), each with the
        parameter ``triton_final_response`` false, then its result with it true. When the
        client closes its side, or the server stops, the answers still due come, then the
        stream ends; a stream the client cancels cancels its requests' jobs."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        tasks: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()

        def streamed(answer: Any, final: bool | None = None) -> Any:
            response = self.messages["ModelStreamInferResponse"]()
            response.infer_response.CopyFrom(answer)
            if final is not None:  # previews were asked for: the decoupled answers' flag
                response.infer_response.parameters["triton_final_response"].bool_param = final
            return response

        def previewed(request: Any, done: int, steps: int | None, pictures: Any) -> None:
            preview = _image_response(
                kserve.pixels_of(pictures), self.options.model_name, request.id
            )
            preview.parameters["step"].int64_param = done
            preview.parameters["steps"].int64_param = steps or 0
            answers.put_nowait(streamed(preview, final=False))

        async def answer(request: Any) -> None:
            def told(done: int, steps: int | None, previews: Any = None) -> None:
                if not previews:
                    return
                try:  # from the worker's thread: answered on the loop
                    loop.call_soon_threadsafe(previewed, request, done, steps, previews)
                except RuntimeError:  # the loop is closed (the server stopped): nobody listens
                    pass

            try:
                result = await self._answer(request, context, told)
                final = True if "preview_every" in request.parameters else None
                response = streamed(result, final)
            except BadRequest as exc:
                response = self.messages["ModelStreamInferResponse"](error_message=exc.message)
            await answers.put(response)

        async def take() -> None:
            async for request in requests:
                tasks.append(asyncio.ensure_future(answer(request)))

        async def read() -> None:
            taking = asyncio.ensure_future(take())
            stop = asyncio.ensure_future(self.stopping.wait())
            try:  # until the client closes its side, or the server stops
                await asyncio.wait({taking, stop}, return_when=asyncio.FIRST_COMPLETED)
                taking.cancel()  # no more requests; those in flight are answered
                await asyncio.gather(*tasks)
            finally:
                stop.cancel()
                taking.cancel()
                answers.put_nowait(None)  # every request answered (or the reading failed)

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
        finally:  # the stream ended, or was cancelled: nothing of it runs on
            for task in (reader, *tasks):
                task.cancel()

    async def _answer(
        self, request: Any, context: Any, previews: ProgressHook | None = None
    ) -> Any:
        """The ModelInferResponse to ``request``, counted in the metrics; BadRequest with
        its status where it fails. ``previews``: told the previews ``preview_every`` asks
        for (a stream's); None: asking for them is refused."""
        arrived, status = time.monotonic(), 200
        try:
            result = await self._infer(request, context, previews)
            response = await off_loop(
                None, infer_response, result, self.options.model_name, request.id
            )
            self.metrics.answered(result, time.monotonic() - arrived)
            return response
        except BadRequest as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            status = 499
            raise
        except Exception as exc:  # unforeseen: still this request's failure alone
            status = 500
            logger.exception("gRPC request failed")
            raise BadRequest(500, f"{type(exc).__name__}: {exc}") from None
        finally:
            self.metrics.requests.labels(str(status)).inc()

    async def _infer(
        self, request: Any, context: Any, previews: ProgressHook | None = None
    ) -> JobResult:
        from sdtrt.runtime.inputs import Limits

        self._answerable(context, request.model_name, request.model_version, key=True)
        request_id = request_id_of(dict(context.invocation_metadata()), request.id)
        max_pixels = Limits.from_env().max_pixels
        try:
            inference = await off_loop(self.intake, read_infer, request, max_pixels)
        except kserve.ProtocolError as exc:
            raise BadRequest(exc.status, exc.message) from None
        values = {k: field_value(v, TYPES[k], k) for k, v in inference.values.items()}
        streamed = previews is not None
        every = preview_every(inference.preview_every, streamed, kserve.PREVIEWS_STREAMED)
        result = await run_job(
            None, request_id, self.batcher, self.intake, values, inference.load,
            timeout=inference.timeout, priority=inference.priority,
            progress=previews if every else None, previews=every_nth(every),
        )  # fmt: skip
        return result

    def _answerable(self, context: Any, model: str, version: str, key: bool) -> None:
        """BadRequest for a missing API key (where the model's calls need one) or a model
        other than this server's (an empty version is the server's choice: its one)."""
        if key and not key_given(self.options.api_key, dict(context.invocation_metadata())):
            raise BadRequest(401, WRONG_KEY)
        if model != self.options.model_name or version not in ("", kserve.VERSION):
            raise BadRequest(
                404,
                f"unknown model {model!r} version {version!r}: this server has "
                f"{self.options.model_name}, version {kserve.VERSION}",
            )

    async def _allowed(self, context: Any, model: str, version: str, key: bool) -> None:
        """The call aborted where it is not answerable."""
        try:
            self._answerable(context, model, version, key)
        except BadRequest as exc:
            await context.abort(_status(exc.status), exc.message)


def _status(http: int) -> Any:
    """The gRPC status for an HTTP status serve/handling.py answers with."""
    grpc, _ = grpc_modules()
    code = grpc.StatusCode
    return {
        400: code.INVALID_ARGUMENT,
        401: code.UNAUTHENTICATED,
        404: code.NOT_FOUND,
        413: code.RESOURCE_EXHAUSTED,
        422: code.INVALID_ARGUMENT,
        429: code.RESOURCE_EXHAUSTED,
        503: code.UNAVAILABLE,
        504: code.DEADLINE_EXCEEDED,
    }.get(http, code.INTERNAL)


class GrpcServer:
    """A gRPC server for ``service`` on its own thread and event loop (uvicorn's loop is
    left to HTTP), started and stopped from the app's lifespan."""

    def __init__(self, service: InferenceService) -> None:
        """At the service options' host and gRPC port, their body limit, and their TLS
        certificate where they have one (the port then speaks TLS only)."""
        options = service.options
        host, port = options.host, options.grpc_port or 0  # (set: the app serves gRPC)
        self.service, self.port, self.tls = service, port, options.tls
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_bytes = int(options.max_body_mb * 1024 * 1024)
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 0.0
        self._thread = threading.Thread(target=self._run, name="sdtrt-grpc", daemon=True)

    def start(self) -> int:
        """Listens; the port it listens on (a free one for port 0)."""
        self._thread.start()
        if not self._started.wait(timeout=30) or self._failure is not None:
            raise BackendUnavailableError(
                f"the gRPC server could not listen on {self.address}: {self._failure}"
            )
        logger.info(
            "serving gRPC%s on %s: %s (KServe v2, Triton's gRPC API), model %s",
            " over TLS" if self.tls else "",
            self.address.rsplit(":", 1)[0] + f":{self.port}",
            SERVICE,
            self.service.options.model_name,
        )
        return self.port

    def stop(self, grace: float) -> None:
        """Stops taking calls; the ones in flight get ``grace`` seconds to finish."""
        if self._loop is not None and self._stop is not None:
            self._grace = grace
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=grace + 10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # said by start(), on the thread that waits for it
            self._failure = exc
            self._started.set()

    async def _serve(self) -> None:
        grpc, _ = grpc_modules()
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
                ("grpc.max_receive_message_length", self.max_bytes),  # --max-body-mb
                ("grpc.max_send_message_length", -1),
            ]
        )
        server.add_generic_rpc_handlers(self.service.handlers())
        # Server reflection (grpcurl and Postman list and call the service without its .proto).
        from grpc_health.v1 import health
        from grpc_reflection.v1alpha import reflection

        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=_compiled()[0])
        if self.tls is None:
            self.port = server.add_insecure_port(self.address)
        else:
            cert, key = (Path(file).read_bytes() for file in self.tls)
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.port = server.add_secure_port(self.address, credentials)
        await server.start()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self._stop.wait()
        self.service.stopping.set()
        await server.stop(self._grace)
