"""Scale-out: ``sdtrt serve`` as a Ray Serve application. One replica is one pipeline (one
GPU where there is one) with its own step batcher, behind Ray's HTTP proxy; the FastAPI app
is the one ``sdtrt serve`` runs (built on each replica, after its pipeline loads), so
validation, errors and metrics are the same. Ray places replicas by resources, scales them
on ongoing requests and restarts a replica whose health check fails.

    sdtrt serve --ray --replicas 2 --model tiny
    serve run sdtrt.serve.ray_app:app_builder model=tiny replicas=2      # Ray's own CLI

Ray is an optional extra (``pip install 'sdtrt[ray]'``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

from ray import serve

from sdtrt.errors import InvalidInputError
from sdtrt.options import backend_options
from sdtrt.serve.options import ServeOptions
from sdtrt.source import ModelSource, parse_embedding, parse_lora

logger = logging.getLogger(__name__)


@serve.deployment(
    name="sdtrt",
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class SdtrtReplica:
    """One pipeline and its batcher; Ray routes each HTTP request to a replica."""

    def __init__(
        self,
        model: dict[str, Any],
        backend: dict[str, Any],
        scheduler: str,
        options: dict[str, Any],
    ) -> None:
        from sdtrt.api import build_pipeline
        from sdtrt.serve.batcher import StepBatcher

        # Plain dicts across Ray: the options are rebuilt (and checked) on the replica.
        self.serve_options = ServeOptions(**options)
        source = ModelSource(**model)
        typed = backend_options(**backend)
        pipeline = build_pipeline(source, typed, scheduler, show_progress=False)
        self.batcher = StepBatcher(pipeline, self.serve_options)
        logger.info("replica %d: %s loaded", os.getpid(), source.model)

    def __serve_build_asgi_app__(self) -> Any:
        from sdtrt.serve.app import create_app

        # not `self.app`: Ray's ASGI wrapper has a property of that name. Ray's proxy gives
        # every request an X-Request-ID (the caller's, else its own: the app logs it) and
        # sets it on the answer itself.
        self.fastapi_app = create_app(self.batcher, self.serve_options, answer_request_id=False)
        return self.fastapi_app

    def check_health(self) -> None:
        """Ray calls this every few seconds; an exception makes it restart the replica."""
        problem = health_problem(self.batcher, self.fastapi_app.state.sdtrt)
        if problem:
            raise RuntimeError(problem)


def health_problem(batcher: Any, app_state: dict[str, Any]) -> str | None:
    """Why a replica is unhealthy (its batcher's worker has stopped, its warm-up failed),
    or None."""
    if not batcher.alive:
        return "the batcher's worker thread has stopped"
    if app_state.get("warmup_failed"):
        return "the warm-up failed"
    return None


def application(
    model: ModelSource,
    backend: str,
    backend_kwargs: dict[str, Any],
    scheduler: str,
    options: ServeOptions,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    num_gpus: float = 0.0,
) -> Any:
    """The bound application: ``replicas`` fixed, or autoscaled between ``min_replicas``
    and ``max_replicas`` on ongoing requests (the batcher's queue is the replica's: a
    target of a few requests per replica keeps step batches full without long waits)."""
    if options.grpc_port is not None:  # every replica would take the one port
        raise InvalidInputError(
            "grpc_port: the gRPC service is not served through Ray Serve's proxy (its HTTP "
            "/v1 and /v2 are); serve without Ray for gRPC"
        )
    deployment_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": 1},
        "max_ongoing_requests": options.max_queue + 16,
    }
    if min_replicas is not None or max_replicas is not None:
        deployment_options["autoscaling_config"] = {
            "min_replicas": min_replicas or 1,
            "max_replicas": max_replicas or max(min_replicas or 1, replicas),
            "target_ongoing_requests": 4,
        }
    else:
        deployment_options["num_replicas"] = replicas
    deployment: Any = SdtrtReplica  # serve.deployment made it a Deployment
    return deployment.options(**deployment_options).bind(
        asdict(model),
        {"backend": backend, **backend_kwargs},
        scheduler,
        asdict(options),
    )


# app_builder's arguments besides ServeOptions' fields, with their defaults.
_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "variant": None,
    "vae": None,
    "lora": None,
    "embedding": None,
    "clip_skip": None,
    "backend": "torch",
    "scheduler": "lms",
    "replicas": 1,
    "min_replicas": None,
    "max_replicas": None,
    "num_gpus": 0,
}
_BACKEND_ARGS = ("precision", "device", "dtype", "engine_dir")


def app_builder(args: dict[str, Any]) -> Any:
    """For Ray's own CLI and config files (``serve run``/``serve deploy``): arguments as
    strings (or YAML's numbers), named as ``sdtrt serve``'s options (model, backend,
    replicas, min_replicas, max_replicas, num_gpus, variant, vae, lora, embedding, clip_skip,
    policy, max_rows, max_queue, timeout, api_key...)."""
    args = dict(args)
    deployment = {k: args.pop(k, default) for k, default in _DEPLOYMENT_DEFAULTS.items()}
    backend_kwargs = {k: args.pop(k) for k in _BACKEND_ARGS if k in args}
    fields = ServeOptions.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        known = sorted([*fields, *_DEPLOYMENT_DEFAULTS, *_BACKEND_ARGS])
        raise ValueError(f"unknown sdtrt serve argument(s) {unknown}; known: {known}")
    options = ServeOptions(**{k: _typed(k, v, str(fields[k].type)) for k, v in args.items()})
    low, high = deployment["min_replicas"], deployment["max_replicas"]
    return application(
        ModelSource(
            deployment["model"],
            variant=deployment["variant"],
            vae=deployment["vae"],
            loras=tuple(map(parse_lora, _listed(deployment["lora"]))),
            embeddings=tuple(map(parse_embedding, _listed(deployment["embedding"]))),
            clip_skip=_typed("clip_skip", deployment["clip_skip"], "int | None"),
        ),
        deployment["backend"],
        backend_kwargs,
        deployment["scheduler"],
        options,
        int(deployment["replicas"]),
        int(low) if low else None,
        int(high) if high else None,
        float(deployment["num_gpus"]),
    )


def _listed(value: Any) -> list[str]:
    """``lora``, ``embedding``: one "FILE[:...]" or a list of them (YAML's), as the repeated
    options of `sdtrt serve`."""
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


def _typed(name: str, value: Any, annotation: str) -> Any:
    """A config value as its ServeOptions field takes it: YAML's null for a field that may
    be None (a number field also takes "auto" or "none"), else a number where the field is
    one. Warm-up sizes stay as given ("HxW,HxW" or pairs): ServeOptions reads both."""
    if annotation.startswith("tuple"):
        return value
    if "None" in annotation and value is None:
        return None
    numeric = "int" in annotation or "float" in annotation
    if numeric and "None" in annotation and str(value).lower() in ("auto", "none"):
        return None
    try:
        if "int" in annotation:
            return int(value)
        if "float" in annotation:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {annotation}, got {value!r}") from None
    return value


def start(host: str, port: int, address: str | None, num_cpus: int | None = None) -> None:
    """Start (or join, with ``address``) a Ray cluster and Serve's HTTP proxy."""
    import ray

    # Ray kills a proxy that is not ready within 5 s, three times running: on a busy small
    # machine (2 cores, replicas importing torch) it never comes up. Patience instead.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    ray.init(address=address, num_cpus=num_cpus, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})


def run(application_: Any, host: str, port: int, address: str | None) -> None:
    """Serve the application on ``host:port`` through Ray's HTTP proxy until Ctrl-C or
    SIGTERM."""
    start(host, port, address)
    serve.run(application_, name="sdtrt", route_prefix="/", blocking=True)
