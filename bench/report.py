"""The benchmark record as a markdown table and as a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGES = ("text_encoder", "vae_encoder", "unet_per_call", "loop_overhead_per_step", "vae_decoder")


def markdown_table(record: dict[str, Any]) -> str:
    ok = [r for r in record["results"] if r["status"] == "ok"]
    reference = {r["batch"]: r["end_to_end_ms"]["p50"] for r in ok if r["backend"] == "diffusers"}
    lines = [
        "| backend | batch | UNet calls | p50 ms | p90 ms | img/s | vs diffusers | text enc ms "
        "| VAE enc ms | UNet/call ms | loop overhead/step ms | VAE dec ms | 1x2B vs 2xB "
        "| first run ms |",
        "| --- |" + " ---: |" * 13,
    ]
    for r in ok:
        e2e, s = r["end_to_end_ms"], r["stages_ms"]
        ratio = reference.get(r["batch"])
        versus = f"{ratio / e2e['p50']:.2f}x" if ratio else "-"
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['unet_calls']} | {e2e['p50']:.1f} "
            f"| {e2e['p90']:.1f} | {r['images_per_s']:.3f} | {versus} | "
            + " | ".join(f"{s[k]:.2f}" for k in STAGES)
            + f" | {_ratio(r['unet_batching']['speedup'])} | {_ms(r.get('first_run_ms'))} |"
        )
    for r in record["results"]:
        if r["status"] != "ok":  # skipped (could not start) or failed (while measured)
            lines.append(f"| {r['backend']} | {r['status']}: {r['reason']} |")
    profiled = [r for r in ok if r.get("profile")]
    if profiled:
        lines += ["", *_profile_table(profiled)]
    return "\n".join(lines)


def _profile_table(rows: list[dict[str, Any]]) -> list[str]:
    """bench --profile: where each row's loop time went on the GPU (bench/trace.py)."""
    lines = [
        "| backend | batch | window | window ms | GPU busy ms | GPU idle ms | busy "
        "| kernels/step | kernel launches/step | graph launches/step | trace |",
        "| --- | ---: | --- |" + " ---: |" * 7 + " --- |",
    ]
    for r in rows:
        p = r["profile"]
        fraction = p["gpu_busy_fraction"]
        cells = [
            _ms(p["window_ms"], 2),
            _ms(p["gpu_busy_ms"], 2),
            _ms(p["gpu_idle_ms"], 2),
            "-" if fraction is None else f"{fraction:.1%}",
            *(_ms(p[k], 1) for k in PER_STEP),
        ]
        lines.append(
            f"| {r['backend']} | {r['batch']} | {p['window']} | "
            + " | ".join(cells)
            + f" | {p['trace']} |"
        )
    return lines


PER_STEP = ("kernels_per_step", "kernel_launches_per_step", "graph_launches_per_step")


def _ms(value: float | None, digits: int = 0) -> str:
    """A time (or count), or "-" where none was taken (no warm-up run, no GPU trace)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    """A speed-up, or "-" where it was not measured (a UNet that compiles per shape)."""
    return "-" if value is None else f"{value:.2f}x"


PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def check_plot_path(path: str | Path) -> str:
    """The format a plot's extension names, and a writable place for it; else a clear error
    before the bench runs."""
    from sdtrt.errors import InvalidInputError
    from sdtrt.fileio import check_output_file

    check_output_file(path, "--plot")
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise InvalidInputError(
            f"--plot {path}: use one of {', '.join(PLOT_FORMATS)} (the extension names the format)"
        )
    return PLOT_FORMATS[suffix]


def plot(record: dict[str, Any], path: str | Path) -> None:
    """Left: stacked per-stage time per backend (smallest batch). Right: throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdtrt.fileio import atomic_path

    fmt = check_plot_path(path)
    ok = [r for r in record["results"] if r["status"] == "ok"]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    smallest = min((r["batch"] for r in ok), default=1)
    parts = {
        "text encoder": lambda r: r["stages_ms"]["text_encoder"],
        "VAE encoder": lambda r: r["stages_ms"]["vae_encoder"],
        "UNet": lambda r: r["stages_ms"]["unet_per_call"] * r["unet_calls"],
        "loop overhead": lambda r: r["stages_ms"]["loop_overhead_per_step"] * r["unet_calls"],
        "VAE decoder": lambda r: r["stages_ms"]["vae_decoder"],
    }
    rows = [next(r for r in ok if r["backend"] == b and r["batch"] == smallest) for b in backends]
    bottom = [0.0] * len(rows)
    for label, value in parts.items():
        heights = [value(r) for r in rows]
        left.bar(backends, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    left.set_ylabel("ms per img2img call")
    left.set_title(f"time per stage, batch {smallest}")
    left.legend()
    for backend in backends:
        points = sorted((r["batch"], r["images_per_s"]) for r in ok if r["backend"] == backend)
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
    right.set_xticks(sorted({r["batch"] for r in ok}))  # whole batch sizes, not 1.2, 1.4...
    right.set_xlabel("batch (images per call)")
    right.set_ylabel("images per second")
    right.set_title("throughput")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)
    plt.close(fig)
