"""`sdtrt img2img`: one run of the pipeline, its images written."""

from __future__ import annotations

import argparse
from typing import Any

from sdtrt.cli.common import (
    GUIDANCE_CUTOFF_HELP,
    MODEL_HELP,
    STEP_GRAPHS_HELP,
    HelpFormatter,
    add_backend_options,
    add_model_source,
    backend_from,
    option_type,
    source_from,
)
from sdtrt.options import (
    BACKENDS,
    SCHEDULER_NAMES,
    SEED_PROMPT,
    Img2ImgJob,
    parse_integers,
    parse_numbers,
)


def add_img2img(sub: Any) -> None:
    job = Img2ImgJob
    p = sub.add_parser(
        "img2img",
        help="run img2img (defaults: the seed notebook's run)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--image", default=None, help="input image (default: a sample picture)")
    p.add_argument("--prompt", default=SEED_PROMPT, help="what the picture should show")
    p.add_argument("--negative-prompt", default=None, help="what it should not show")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    knob = p.add_mutually_exclusive_group()
    knob.add_argument(
        "--strength", type=float, default=None, help="noise added, in (0, 1] (default: 0.8)"
    )
    knob.add_argument(
        "--start-step", type=int, default=None, help="first step, in [0, steps): the same knob"
    )
    p.add_argument("--steps", type=int, default=job.steps, help="scheduler steps")
    p.add_argument("--guidance", type=float, default=job.guidance, help="guidance scale")
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help=GUIDANCE_CUTOFF_HELP,
    )
    p.add_argument("--scheduler", default="lms", choices=SCHEDULER_NAMES, help="scheduler")
    schedule = p.add_mutually_exclusive_group()
    schedule.add_argument(
        "--timesteps",
        type=option_type(parse_integers),
        default=None,
        help="a schedule in place of --steps, e.g. Align Your Steps' for SD 1.5: "
        "999,850,736,645,545,455,343,233,124,24 (euler, dpmpp_2m, lcm, tcd)",
    )
    schedule.add_argument(
        "--sigmas",
        type=option_type(parse_numbers),
        default=None,
        help="or its sigmas, one more than the steps (euler)",
    )
    p.add_argument(
        "--eta", type=float, default=job.eta, help="ddim's per-step noise (tcd's gamma), in [0, 1]"
    )
    p.add_argument("--seed", type=int, default=job.seed, help="in [0, 2^64 - 1]")
    p.add_argument(
        "--height", type=int, default=None, help="pixels (default: the image's, rounded down)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="pixels (default: the image's, rounded down)"
    )
    p.add_argument("--batch", type=int, default=job.batch, help="images per prompt")
    add_backend_options(p)
    p.add_argument("--step-graphs", action="store_true", help=STEP_GRAPHS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--out",
        default=job.out,
        help="output image, PNG/JPEG/WebP by extension (JPEG at quality 95, WebP 90); a batch "
        "writes NAME-0.EXT, NAME-1.EXT...",
    )
    p.set_defaults(handler=_run_img2img)


def _run_img2img(args: argparse.Namespace) -> int:
    from sdtrt.api import img2img

    job = Img2ImgJob(
        prompt=args.prompt,
        image=args.image,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        start_step=args.start_step,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch=args.batch,
        timesteps=args.timesteps,
        sigmas=args.sigmas,
        guidance_cutoff=args.guidance_cutoff,
        out=args.out,
    )
    result, paths = img2img(
        source_from(args),
        job,
        backend_from(args),
        args.scheduler,
        show_progress=not args.no_progress,
    )
    for picture, path in zip(result.images, paths, strict=True):
        print(f"wrote {path} ({picture.width}x{picture.height})")
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
    print(f"{result.unet_calls} UNet calls; {stages}")
    return 0
