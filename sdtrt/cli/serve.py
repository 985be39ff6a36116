"""`sdtrt serve` (HTTP, or Ray Serve) and `sdtrt bench-serve` (load against it)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from sdtrt.cli.common import (
    GUIDANCE_CUTOFF_HELP,
    MODEL_HELP,
    HelpFormatter,
    add_backend_options,
    add_model_source,
    add_record_outputs,
    backend_from,
    check_record_outputs,
    invalid,
    source_from,
    unavailable,
    write_record_outputs,
)
from sdtrt.options import BACKENDS, SCHEDULER_NAMES, UNET_SWITCHES, parse_sizes
from sdtrt.serve.options import ServeOptions


def add_serve(sub: Any) -> None:
    from sdtrt.serve.options import SERVE_POLICIES

    o = ServeOptions
    p = sub.add_parser(
        "serve",
        help="serve img2img over HTTP, batching concurrent requests at every denoising step",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    add_backend_options(p)
    p.add_argument(
        "--scheduler", default="lms", choices=SCHEDULER_NAMES, help="the default per request"
    )
    p.add_argument("--steps", type=int, default=o.steps, help="the default per request")
    p.add_argument("--guidance", type=float, default=o.guidance, help="the default per request")
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help="the default per request: " + GUIDANCE_CUTOFF_HELP,
    )
    p.add_argument(
        "--strength",
        type=float,
        default=o.strength,
        help="the default per request that sends neither strength nor start_step",
    )
    p.add_argument("--host", default=o.host, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=o.port, help="TCP port")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="UNet rows per call (2 per guided image; default: the TensorRT profile's "
        "maximum, else 16)",
    )
    p.add_argument("--max-queue", type=int, default=o.max_queue, help="waiting requests; 429 past")
    add_intra_op_threads(p)
    p.add_argument("--policy", default=o.policy, choices=SERVE_POLICIES, help="batching policy")
    p.add_argument(
        "--priority-levels",
        type=int,
        default=o.priority_levels,
        help="priority levels a request may name (its priority field, Triton's schedule-policy "
        "parameter): 1 is admitted first; 0 and none are the lowest, N (default: 0, none)",
    )
    p.add_argument(
        "--queue-delay", type=float, default=o.queue_delay, help="request policy: seconds"
    )
    p.add_argument("--timeout", type=float, default=o.timeout, help="seconds per request (504)")
    p.add_argument("--drain-timeout", type=float, default=o.drain_timeout, help="on SIGTERM")
    p.add_argument("--max-body-mb", type=float, default=o.max_body_mb, help="413 past it")
    p.add_argument(
        "--warmup-sizes",
        default=None,
        help="HxW,HxW: before /ready, run every UNet row count and VAE batch the server can "
        "form at these sizes, so that CUDA graph captures and per-shape compiles (--compile, "
        "TensorRT-RTX) happen before the first requests, not during them (default: one "
        "small request)",
    )
    p.add_argument(
        "--preview-vae",
        metavar="DIR",
        default=None,
        help="a TAESD (madebyollin/taesd's diffusers folder, or a folder of TAESD's "
        "taesd_decoder .safetensors) that decodes the stream's previews in place of the "
        "model's VAE: a small share of the work, approximate images (default: the model's VAE)",
    )
    p.add_argument(
        "--cors-origins",
        metavar="ORIGIN,ORIGIN",
        default="",
        help="web pages' origins (https://ui.example.com; *: any) whose scripts may call the "
        "API from a browser (CORS; default: none)",
    )
    p.add_argument(
        "--model-name",
        default=o.model_name,
        help="the model's name in the Open Inference Protocol's paths "
        "(/v2/models/NAME/infer): what Triton and KServe clients ask for; its id in OpenAI's "
        "API (the model of /v1/images/edits) and A1111's (sd_model_checkpoint)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the Open Inference Protocol over gRPC on this port (Triton's is "
        "8001; pip install 'sdtrt[grpc]')",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="required on /v1 and /metrics (else $SDTRT_API_KEY, which keeps it out of the "
        "process list; neither: open)",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve HTTPS (and gRPC over TLS) with this certificate (chain), with --tls-key "
        "(default: plain HTTP, for a proxy in front that terminates TLS)",
    )
    p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key, unencrypted")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'sdtrt[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application")
    ray.add_argument(
        "--address", default=None, help="a running Ray cluster (default: start a local one)"
    )
    ray.add_argument("--replicas", type=int, default=1, help="replicas, one pipeline each")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale from")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale to")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray num_gpus")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from sdtrt.options import backend_options
    from sdtrt.serve.server import run

    options = ServeOptions(
        policy=args.policy,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        intra_op_threads=intra_op_threads_from(args),
        queue_delay=args.queue_delay,
        timeout=args.timeout,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("SDTRT_API_KEY") or None,
        max_body_mb=args.max_body_mb,
        drain_timeout=args.drain_timeout,
        warmup_sizes=parse_sizes(args.warmup_sizes or "", "--warmup-sizes"),
        steps=args.steps,
        guidance=args.guidance,
        strength=args.strength,
        guidance_cutoff=args.guidance_cutoff,
        model_name=args.model_name,
        grpc_port=args.grpc_port,
        priority_levels=args.priority_levels,
        preview_vae=args.preview_vae,
        cors_origins=args.cors_origins,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    if args.ray and args.grpc_port is not None:
        raise invalid("--grpc-port is not served through Ray Serve's proxy: serve without --ray")
    if args.ray and options.tls:
        raise invalid("--tls-cert: Ray Serve's proxy speaks plain HTTP; terminate TLS in front")
    if not args.ray:
        for flag in ("address", "min_replicas", "max_replicas"):
            if getattr(args, flag) is not None:
                raise invalid(f"--{flag.replace('_', '-')} is for --ray")
        run(source_from(args), backend_from(args), args.scheduler, options)
        return 0
    try:
        import sdtrt.serve.ray_app as ray_app
    except ImportError:
        raise unavailable("--ray needs Ray Serve: pip install 'sdtrt[ray]'") from None
    backend_kwargs = {
        k: v
        for k in ("precision", "device", "dtype", "cuda_graphs", "engine_dir", *UNET_SWITCHES)
        if (v := getattr(args, k)) not in (None, False)
    }
    backend_options(args.backend, **backend_kwargs)  # refused here, not on each replica
    application = ray_app.application(
        source_from(args),
        args.backend,
        backend_kwargs,
        args.scheduler,
        options,
        args.replicas,
        args.min_replicas,
        args.max_replicas,
        args.gpus_per_replica,
    )
    ray_app.run(application, args.host, args.port, args.address)
    return 0


def add_bench_serve(sub: Any) -> None:
    from sdtrt.serve.loadgen import LoadConfig

    c = LoadConfig
    p = sub.add_parser(
        "bench-serve",
        help="open-loop Poisson load on sdtrt serve over loopback: one-at-a-time, "
        "request-level and step-level batching compared",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    add_backend_options(p)
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in c.rates), help="req/s, comma")
    p.add_argument("--requests", type=int, default=c.requests, help="per policy and rate")
    p.add_argument("--duration", type=float, default=c.duration, help="seconds of sending, max")
    p.add_argument("--policies", default=",".join(c.policies), help="comma-separated")
    p.add_argument("--steps", type=int, default=c.steps, help="scheduler steps per request")
    p.add_argument("--strength", default="0.3-1.0", help="uniform range LOW-HIGH")
    p.add_argument("--sizes", default="512x512", help="HxW, comma-separated: drawn per request")
    p.add_argument("--guidance", type=float, default=c.guidance, help="guidance scale")
    p.add_argument(
        "--guidance-cutoff", type=float, default=None, help="per request: " + GUIDANCE_CUTOFF_HELP
    )
    p.add_argument("--scheduler", default=c.scheduler, choices=SCHEDULER_NAMES, help="scheduler")
    p.add_argument("--queue-delay", type=float, default=c.queue_delay, help="request policy")
    p.add_argument("--max-rows", type=int, default=None, help="UNet rows per call")
    add_intra_op_threads(p)
    p.add_argument(
        "--url",
        default=None,
        help="drive the server already running there (e.g. sdtrt serve --ray) as it is "
        "configured, instead of starting one per policy; its API key from $SDTRT_API_KEY",
    )
    add_record_outputs(p)
    p.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from sdtrt.serve.loadgen import LoadConfig, markdown_table, plot, ratios, run_load_bench

    try:
        rates = tuple(float(r) for r in args.rates.split(","))
        low, high = (float(v) for v in args.strength.split("-"))
    except ValueError:
        raise invalid("--rates: numbers, comma-separated; --strength LOW-HIGH") from None
    sizes = parse_sizes(args.sizes, "--sizes")
    config = LoadConfig(
        rates=rates,
        requests=args.requests,
        duration=args.duration,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        steps=args.steps,
        strength=(low, high),
        sizes=sizes,
        guidance=args.guidance,
        guidance_cutoff=args.guidance_cutoff,
        scheduler=args.scheduler,
        queue_delay=args.queue_delay,
        max_rows=args.max_rows,
        intra_op_threads=intra_op_threads_from(args),
    )
    check_record_outputs(args)
    record = run_load_bench(source_from(args), backend_from(args), config, args.url)
    print(markdown_table(record))
    print("\n".join(ratios(record)))
    write_record_outputs(args, record, plot)
    return 0 if all(r["ok"] for r in record["results"]) else 1


def add_intra_op_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--intra-op-threads",
        default=str(ServeOptions.intra_op_threads),
        help="CPU device: PyTorch threads per operator in the batching worker, or 'auto' "
        "(PyTorch's own: one per core); more pays for big models on many cores",
    )


def intra_op_threads_from(args: argparse.Namespace) -> int | None:
    if args.intra_op_threads == "auto":
        return None
    try:
        return int(args.intra_op_threads)
    except ValueError:
        raise invalid(
            f"--intra-op-threads: an integer >= 1 or auto, got {args.intra_op_threads!r}"
        ) from None
