"""Sweep ONNX Runtime session settings on one exported network and report the median call
time of each, with session creation time. How the ORT backend's defaults were chosen:

    python -m sdtrt.bench.ort_sweep DIR --network unet --batch 1 --height 256 --width 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from sdtrt.export.folder import ExportedModel

SETTINGS: list[dict[str, Any]] = [
    {"optimization": "basic", "threads": 0, "arena": True, "spinning": True},
    {"optimization": "extended", "threads": 0, "arena": True, "spinning": True},
    {"optimization": "all", "threads": 0, "arena": True, "spinning": True},
    {"optimization": "basic", "threads": 1, "arena": True, "spinning": True},
    {"optimization": "basic", "threads": 0, "arena": False, "spinning": True},
    {"optimization": "basic", "threads": 0, "arena": True, "spinning": False},
]


def sweep(exported: ExportedModel, network: str, batch: int, height: int, width: int, repeats: int):
    import onnxruntime as ort

    from sdtrt.engine.ort_backend import session_options

    contract = exported.network(network, "fp32")
    feeds = {k: v.numpy() for k, v in contract.sample_inputs("fp32", batch, height, width).items()}
    path = str(exported.graph_path(network, "fp32"))
    rows = []
    for setting in SETTINGS:
        options = session_options(
            setting["optimization"], setting["threads"], setting["arena"], setting["spinning"]
        )
        start = time.perf_counter()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        load = time.perf_counter() - start
        session.run(None, feeds)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - start) * 1e3)
        rows.append({**setting, "load_s": load, "median_ms": statistics.median(times)})
        print(rows[-1], flush=True)
        del session
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--network", default="unet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = sweep(
        ExportedModel.open(Path(args.folder)),
        args.network,
        args.batch,
        args.height,
        args.width,
        args.repeats,
    )
    base = rows[0]["median_ms"]
    print("| optimisation | threads | arena | spinning | load s | median ms | vs first |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['optimization']} | {r['threads']} | {r['arena']} | {r['spinning']} "
            f"| {r['load_s']:.1f} | {r['median_ms']:.0f} | {base / r['median_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
