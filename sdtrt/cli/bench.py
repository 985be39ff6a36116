"""`sdtrt bench`: latency per stage and throughput, backends and diffusers side by side."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

from sdtrt.bench.config import BENCH_BACKENDS, SOURCE_FIELDS, BenchConfig
from sdtrt.cli.common import (
    GUIDANCE_CUTOFF_HELP,
    MODEL_HELP,
    PRECISION_HELP,
    REFERENCE_HELP,
    STEP_GRAPHS_HELP,
    HelpFormatter,
    add_engine_dir,
    add_model_source,
    add_record_outputs,
    add_unet_tuning,
    check_record_outputs,
    device_type,
    invalid,
    source_fields,
    write_record_outputs,
)
from sdtrt.options import (
    DEVICES,
    ORT_OPTIMIZATION_LEVELS,
    PRECISIONS,
    SCHEDULER_NAMES,
    UNET_SWITCHES,
)


def add_bench(sub: Any) -> None:
    config = BenchConfig  # its class defaults: an instance would check the environment
    p = sub.add_parser(
        "bench",
        help="latency per stage, throughput, with diffusers side by side",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=config.model, help=MODEL_HELP)
    add_model_source(p)
    p.add_argument("--reference", default=None, help=REFERENCE_HELP + " (torch, diffusers rows)")
    p.add_argument(
        "--backends",
        default=",".join(config.backends),
        help="comma-separated rows, among: " + ", ".join(BENCH_BACKENDS) + "; a torch or "
        "TensorRT row may add switches of its own (torch+step-graphs+compile)",
    )
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--height", type=int, default=config.height, help="pixels")
    p.add_argument("--width", type=int, default=config.width, help="pixels")
    p.add_argument("--steps", type=int, default=config.steps, help="scheduler steps")
    p.add_argument("--strength", type=float, default=config.strength, help="in (0, 1]")
    p.add_argument("--scheduler", default=config.scheduler, choices=SCHEDULER_NAMES, help="")
    p.add_argument(
        "--guidance",
        type=float,
        default=config.guidance,
        help="guidance scale (1 or less: the prompt row alone, as LCM-LoRA runs)",
    )
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help=GUIDANCE_CUTOFF_HELP + "; every row runs it, diffusers' too",
    )
    p.add_argument(
        "--device",
        default=config.device,
        choices=DEVICES,
        type=device_type,
        help="torch and diffusers",
    )
    p.add_argument("--dtype", default=config.dtype, choices=PRECISIONS, help="torch and diffusers")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--cuda-graphs", action="store_true", help="torch and TensorRT")
    p.add_argument("--step-graphs", action="store_true", help=STEP_GRAPHS_HELP)
    add_engine_dir(p)
    add_unet_tuning(p)
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="one more run per row under torch.profiler: traces in DIR, GPU busy vs idle",
    )
    p.add_argument("--warmup", type=int, default=config.warmup, help="runs before timing")
    p.add_argument("--repeats", type=int, default=config.repeats, help="timed runs")
    p.add_argument(
        "--ort-optimization",
        default=config.ort_optimization,
        choices=ORT_OPTIMIZATION_LEVELS,
        help="auto: all for the VAE, basic else",
    )
    p.add_argument(
        "--ort-threads", type=int, default=config.ort_threads, help="0: ONNX Runtime chooses"
    )
    add_record_outputs(p)
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from sdtrt.bench.benchmark import run_bench
    from sdtrt.bench.report import markdown_table, plot

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise invalid(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    config = BenchConfig(
        **{SOURCE_FIELDS[name]: value for name, value in source_fields(args).items()},
        reference=args.reference,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        batches=batches,
        height=args.height,
        width=args.width,
        steps=args.steps,
        strength=args.strength,
        scheduler=args.scheduler,
        guidance=args.guidance,
        guidance_cutoff=args.guidance_cutoff,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        cuda_graphs=args.cuda_graphs,
        step_graphs=args.step_graphs,
        **{field: getattr(args, field) for field in UNET_SWITCHES},
        profile=args.profile,
        warmup=args.warmup,
        repeats=args.repeats,
        ort_optimization=args.ort_optimization,
        ort_threads=args.ort_threads,
        engine_dir=args.engine_dir,
    )
    check_record_outputs(args)
    progress = None
    if args.json:  # each row as it is measured: a run cut short keeps what it finished
        from sdtrt.fileio import write_json

        progress = functools.partial(write_json, args.json)
    record = run_bench(config, progress=progress)
    print(markdown_table(record))
    write_record_outputs(args, record, plot)
    if not any(row["status"] == "ok" for row in record["results"]):
        print("sdtrt: bench: every backend was skipped: nothing was measured", file=sys.stderr)
        return 1
    failed = [row["backend"] for row in record["results"] if row["status"] == "failed"]
    if failed:
        print(f"sdtrt: bench: failed while measured: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
