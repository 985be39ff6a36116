"""``sdtrt serve --compile`` with ``--warmup-sizes`` against without: how long the server takes
to be ready, and how long the first requests then take.

    python bench/serve_warmup_ab.py [REPEATS]

torch.compile (inductor) compiles the UNet once per input shape, and a step-batching server
forms a shape per row count: without the warm-up, the first requests of each new row count
wait for a compile; with it, the compiles happen before /ready. Tiny model, torch fp32 on
the CPU, max_rows 4. Each side runs in a fresh process (dynamo's compiled code is
per-process) with an empty inductor cache, as on a fresh machine (a kept cache makes
compiles faster, not free); the two sides alternate. In each: the pipeline loads, the
batcher warms up as ``sdtrt serve`` does (its shapes, then one small request), then a burst
of 3 concurrent requests at 64x64 (guided and unguided at different strengths: UNet calls
of 4, 3, 2 and 1 rows), then the same burst again (every shape compiled by then).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BURST = [(5.0, 1.0), (1.0, 0.75), (1.0, 0.5)]  # (guidance, strength), 4 steps each
SIZE = 64


def one_side(warm: bool) -> dict[str, float]:
    """In this process: seconds to load, to ready, and for each burst."""
    import torch

    from sdtrt.options import TorchOptions
    from sdtrt.runtime.pipeline import Img2ImgPipeline
    from sdtrt.serve.app import warm_up
    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.jobs import Img2ImgRequest
    from sdtrt.serve.options import ServeOptions

    start = time.perf_counter()
    options = TorchOptions(compile_unet=True)
    pipe = Img2ImgPipeline.from_pretrained("tiny", options, show_progress=False)
    loaded = time.perf_counter()
    sizes = ((SIZE, SIZE),) if warm else ()
    batcher = StepBatcher(pipe, ServeOptions(max_rows=4, warmup_sizes=sizes))
    state: dict[str, bool] = {}
    warm_up(batcher, state)  # what `sdtrt serve` runs before /ready says 200
    if not state.get("ready"):
        raise RuntimeError("the warm-up failed (its log says why)")
    figures = {"load_s": loaded - start, "ready_s": time.perf_counter() - loaded}
    for burst in ("first", "second"):
        begun = time.perf_counter()
        futures = [
            batcher.submit(
                batcher.prepare(
                    Img2ImgRequest(
                        prompt="a red circle on a blue background",
                        height=SIZE,
                        width=SIZE,
                        guidance_scale=guidance,
                        strength=strength,
                        num_inference_steps=4,
                        seed=i,
                    )
                )
            )
            for i, (guidance, strength) in enumerate(BURST)
        ]
        for future in futures:
            future.result()
        figures[f"{burst}_burst_s"] = time.perf_counter() - begun
    batcher.close()
    figures["threads"] = torch.get_num_threads()
    return figures


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for _ in range(repeats):
        for side in runs:
            code = (
                "import json; from sdtrt.bench.serve_warmup_ab import one_side; "
                f"print(json.dumps(one_side({side == 'with'})))"
            )
            with tempfile.TemporaryDirectory() as cache:  # a fresh machine's: compiles cold
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
            print(side, runs[side][-1], flush=True)
    print("\n| warm-up sizes | load s | to ready s | first burst s | second burst s |")
    print("| --- | --- | --- | --- | --- |")
    medians = {}
    for side, figures in runs.items():
        medians[side] = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        m = medians[side]
        label = f"{SIZE}x{SIZE}" if side == "with" else "none"
        print(
            f"| {label} | {m['load_s']:.1f} | {m['ready_s']:.1f} | {m['first_burst_s']:.1f} "
            f"| {m['second_burst_s']:.1f} |"
        )
    ratio = medians["without"]["first_burst_s"] / medians["with"]["first_burst_s"]
    print(f"\nfirst burst after ready: {ratio:.1f}x faster with the warm-up (medians of {repeats})")


if __name__ == "__main__":
    main()
