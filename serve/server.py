"""Running the app: uvicorn in the foreground for ``sdtrt serve`` (SIGTERM drains: no new
requests, the ones in flight finish within the drain timeout, exit 0), or in a background
thread on a free loopback port for the tests and the load benchmark."""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from sdtrt.errors import InvalidInputError
from sdtrt.options import BackendOptions
from sdtrt.serve.options import ServeOptions
from sdtrt.source import ModelSource

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it drains as soon as a stop signal arrives, so
    /ready turns 503 and the batcher takes nothing new while what runs finishes."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.sdtrt_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        logger.info("stop signal %d: draining (no new requests; in-flight ones finish)", sig)
        self.sdtrt_app.state.sdtrt["draining"] = True
        self.sdtrt_app.state.batcher.drain()
        super().handle_exit(sig, frame)


def bound_socket(host: str, port: int, flag: str = "--port") -> socket.socket:
    """The server's address, taken before the model loads: a port in use is said at once,
    not after a load (or an export) of minutes. Bound, not yet listening: until uvicorn
    listens, after the load, a client is refused rather than left waiting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += f" (another server is there): choose another {flag}"
        raise InvalidInputError(f"cannot listen on {host} port {port}: {why}") from None
    return sock


def warn_if_open(sock: socket.socket, api_key: str | None) -> None:
    """A server reachable from other machines without an API key is said at start."""
    host = sock.getsockname()[0]  # an address: "localhost" resolved, 127.0.0.0/8 is loopback
    if not ipaddress.ip_address(host).is_loopback and api_key is None:
        logger.warning("listening on %s without --api-key: anyone who reaches it may use it", host)


def serve_forever(app: FastAPI, sock: socket.socket, options: ServeOptions) -> None:
    config = uvicorn.Config(
        app,
        timeout_graceful_shutdown=int(options.drain_timeout),
        log_level="info",
        access_log=False,
        ssl_certfile=options.tls_cert,
        ssl_keyfile=options.tls_key,
    )
    # uvicorn re-raises the stop signal after its graceful shutdown, to the handler that was
    # there before it ran (the default one kills the process: exit -15). A drained stop is
    # a clean exit: the handler it finds is one that returns.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    host, port = sock.getsockname()[:2]
    # uvicorn prints its "running on" line only for sockets it bound itself.
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "serving on %s://%s:%d: POST /v1/img2img, /v2/models/%s/infer (KServe v2, Triton's "
        "HTTP API), /v1/images/edits (OpenAI's), /sdapi/v1/img2img (A1111's); /docs (Ctrl-C "
        "or SIGTERM: drain, then stop)",
        options.scheme,
        shown,
        port,
        options.model_name,
    )
    DrainingServer(config, app).run(sockets=[sock])


class BackgroundServer:
    """The app on 127.0.0.1 at a free port, in a thread (``with`` stops it)."""

    def __init__(
        self, app: FastAPI, drain_timeout: float = 10.0, tls: tuple[str, str] | None = None
    ) -> None:
        """``tls``: (certificate, key) PEM files: HTTPS."""
        self.socket = bound_socket("127.0.0.1", 0)
        self.port = int(self.socket.getsockname()[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        cert, key = tls or (None, None)
        self.verify = tls is None  # its own polls of itself, on loopback: not the certificate
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=int(drain_timeout),
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
        self.server = DrainingServer(config, app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start within 30 s")
            time.sleep(0.01)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/ready", timeout=5, verify=self.verify).status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready within {timeout} s")


def run(
    model: str | ModelSource,
    backend: BackendOptions | str,
    scheduler: str = "lms",
    options: ServeOptions = ServeOptions(),
) -> None:
    """``sdtrt serve``: load (and export or build, once) the model, then answer on
    ``options.host:options.port`` until SIGTERM or Ctrl-C; /ready says 200 after warm-up."""
    from sdtrt.api import build_pipeline
    from sdtrt.serve.app import create_app
    from sdtrt.serve.batcher import StepBatcher

    sock = bound_socket(options.host, options.port)
    warn_if_open(sock, options.api_key)
    if options.grpc_port is not None:  # what would stop it is said before the model loads
        from sdtrt.serve.grpc_api import messages

        messages()
        if options.grpc_port != 0:
            bound_socket(options.host, options.grpc_port, "--grpc-port").close()
    with sock:
        pipeline = build_pipeline(model, backend, scheduler, show_progress=False)
        app = create_app(StepBatcher(pipeline, options), options)
        serve_forever(app, sock, options)
