"""GPU tests: TensorRT engines and the PyTorch CUDA path. Marked `gpu`; each skips with its
reason where there is no CUDA GPU (or no TensorRT). Run them with `pytest -m gpu`."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import diffusers_img2img

from sdtrt.bench.check import THRESHOLDS, compare_images
from sdtrt.engine.trt_build import tensorrt_version
from sdtrt.options import BuildRanges, TensorRTOptions, TorchOptions
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.schedulers import SCHEDULERS

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = tensorrt_version() is not None
cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRT),
    reason="needs an NVIDIA GPU and TensorRT (pip install 'sdtrt[tensorrt]')",
)
pytestmark = pytest.mark.gpu
RUN = dict(strength=0.75, num_inference_steps=8, output_type="np")


def _own(components):
    """A copy for a CUDA pipeline: the torch backend moves its modules in place, as diffusers'
    ``pipeline.to()`` does, and the session's ``tiny`` must stay on the CPU in fp32."""
    return copy.deepcopy(components)


def _image(seed=0):
    return torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


@cuda
def test_torch_cuda_fp16_matches_cpu_fp32(tiny):
    gpu = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda", dtype="fp16"), show_progress=False
    )
    cpu = Img2ImgPipeline.from_components(tiny, show_progress=False)
    got = gpu("a dancer", _image(), generator=torch.Generator().manual_seed(1), **RUN).images
    want = cpu("a dancer", _image(), generator=torch.Generator().manual_seed(1), **RUN).images
    assert compare_images(got, want, "fp16").passed


@cuda
def test_torch_cuda_graph_replay_equals_plain_run(tiny):
    on_gpu = _own(tiny)
    plain = Img2ImgPipeline.from_components(
        on_gpu, TorchOptions(device="cuda"), show_progress=False
    )
    graphed = Img2ImgPipeline.from_components(
        on_gpu, TorchOptions(device="cuda", cuda_graphs=True), show_progress=False
    )
    a = plain("a", _image(), generator=torch.Generator().manual_seed(2), **RUN).images
    b = graphed("a", _image(), generator=torch.Generator().manual_seed(2), **RUN).images
    np.testing.assert_allclose(a, b, atol=1e-6)


def _no_sync(fn):
    """``fn`` under PyTorch's sync debug mode: a synchronising call in it raises."""

    def call(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return call


@cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_the_eager_loop_does_not_wait_for_the_gpu(tiny, cuda_graphs):
    """The loop the bench's torch rows time: with memos warm and the UNet captured, no UNet
    call, input scaling or scheduler step makes a synchronising call (sync debug mode)."""
    pipe = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda", cuda_graphs=cuda_graphs), show_progress=False
    )

    def run():
        return pipe("a", _image(), generator=torch.Generator().manual_seed(8), **RUN).images

    want = run()  # the warm run: memos, captures
    pipe.backend.unet = _no_sync(pipe.backend.unet)
    pipe.scheduler.step = _no_sync(pipe.scheduler.step)
    pipe.scheduler.scale_model_input = _no_sync(pipe.scheduler.scale_model_input)
    np.testing.assert_allclose(run(), want, atol=1e-6)


# Every scheduler whose steps are tabulated (the SDE solver's and TCD's are not: UNet-only
# graphs).
STEP_GRAPHED = [name for name in SCHEDULERS if name not in ("dpmpp_2m_sde_karras", "tcd")]


@cuda
@pytest.mark.parametrize("scheduler", STEP_GRAPHED)
def test_step_graphs_equal_the_eager_loop_on_cuda(tiny, scheduler):
    """Whole steps replayed as CUDA graphs (runtime/step_graph.py) against the eager loop:
    fp32 within 1e-6, fp16 within the fp16 bound; one capture serves two schedules (two
    strengths) and two guidance scales."""
    on_gpu = _own(tiny)
    for dtype, bound in (("fp32", 1e-6), ("fp16", 1e-3)):
        eager, graphed = (
            Img2ImgPipeline.from_components(
                on_gpu,
                TorchOptions(device="cuda", dtype=dtype, step_graphs=graphs),
                scheduler=scheduler,
                show_progress=False,
            )
            for graphs in (False, True)
        )
        for strength, guidance in ((1.0, 3.0), (0.5, 7.5)):
            run = dict(strength=strength, num_inference_steps=12, guidance_scale=guidance)
            a, b = (
                pipe("a red circle", _image(), generator=torch.Generator().manual_seed(4),
                     output_type="latent", **run).images
                for pipe in (eager, graphed)
            )  # fmt: skip
            rel = float((a - b).norm() / a.norm())
            assert rel <= bound, (dtype, strength, rel)
        assert len(graphed.step_graphs.captured) == 1


@cuda
@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "dpmpp_2m"])
def test_a_guidance_cutoff_in_step_graphs_equals_the_eager_callback_on_cuda(tiny, scheduler):
    """GuidanceCutoffCallback under step graphs: the guided steps' capture, then the cond
    rows' capture from its state; the eager loop calling the callback, within 1e-6 (fp32)."""
    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    on_gpu = _own(tiny)
    eager, graphed = (
        Img2ImgPipeline.from_components(
            on_gpu,
            TorchOptions(device="cuda", step_graphs=graphs),
            scheduler=scheduler,
            show_progress=False,
        )
        for graphs in (False, True)
    )
    run = dict(strength=0.8, num_inference_steps=12, guidance_scale=7.5, output_type="latent")
    run["callback_on_step_end"] = GuidanceCutoffCallback(cutoff_step_ratio=0.4)
    a, b = (
        pipe(["a red circle", "a cat"], _image(), generator=torch.Generator().manual_seed(4),
             **run).images
        for pipe in (eager, graphed)
    )  # fmt: skip
    assert float((a - b).norm() / a.norm()) <= 1e-6
    assert len(graphed.step_graphs.captured) == 2  # 2B rows, then B


def _graph_pool_bytes():
    """GPU memory the caching allocator holds for CUDA graph pools (every pool but the
    default one)."""
    segments = torch.cuda.memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s["segment_pool_id"]) != (0, 0))


@cuda
def test_unet_graphs_share_one_memory_pool(tiny):
    """The UNet's captures, one per row count, share a memory pool: three row counts take
    about the memory of the largest alone (private pools: about 1.75x), and replayed in
    any order each still equals the eager call."""
    import gc

    from sdtrt.engine.cuda_graphs import CudaGraphed

    unet = _own(tiny)["unet"].to("cuda").eval()

    def call(sample, timestep, hidden):
        return unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    g = torch.Generator(device="cuda").manual_seed(0)
    c = unet.config
    inputs = {
        rows: (
            torch.randn(rows, c.in_channels, 64, 64, device="cuda", generator=g),
            torch.full((rows,), 500.0, device="cuda"),
            torch.randn(rows, 77, c.cross_attention_dim, device="cuda", generator=g),
        )
        for rows in (8, 4, 2)
    }
    with torch.inference_mode():
        eager = {rows: call(*x) for rows, x in inputs.items()}

    def pool_growth(order):
        gc.collect()
        torch.cuda.empty_cache()
        before = _graph_pool_bytes()
        graphed = CudaGraphed(call)
        for rows in order:
            graphed(*inputs[rows])
        torch.cuda.synchronize()
        return graphed, _graph_pool_bytes() - before

    largest, alone = pool_growth([8])
    del largest
    graphed, shared = pool_growth([8, 4, 2])
    assert 0 < shared < 1.2 * alone, (shared, alone)
    for rows in (2, 8, 4, 2, 8):
        torch.testing.assert_close(graphed(*inputs[rows]), eager[rows])


@cuda
def test_step_graphs_keep_the_most_recent_captures(tiny, monkeypatch):
    """Beyond ``max_captures`` the least recently used capture goes; a shape seen again is
    captured again, with the same result."""
    from sdtrt.runtime.step_graph import StepGraphs

    monkeypatch.setattr(StepGraphs, "max_captures", 1)
    pipe = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda", step_graphs=True), show_progress=False
    )
    run = dict(strength=0.6, num_inference_steps=6, output_type="latent")
    first, other, again = (
        pipe("a", _image(), generator=torch.Generator().manual_seed(5), height=h, **run).images
        for h in (32, 48, 32)
    )
    assert len(pipe.step_graphs.captured) == 1
    assert other.shape[-2] == 6 and again.shape[-2] == 4
    torch.testing.assert_close(first, again, rtol=1e-6, atol=1e-6)


@cuda
@pytest.mark.parametrize("switch", ["channels_last", "fuse_qkv", "compile_unet"])
def test_unet_switches_inside_step_graphs(tiny, switch):
    """Each UNet switch (inductor's compiled UNet included) captured inside whole-step
    graphs: fp16, within the fp16 bound of the plain eager loop."""
    if switch == "compile_unet" and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("inductor's Triton launcher needs a C compiler, and this machine has none")
    on_gpu = _own(tiny)
    plain = Img2ImgPipeline.from_components(
        on_gpu, TorchOptions(device="cuda", dtype="fp16"), show_progress=False
    )
    want = plain("a", _image(), generator=torch.Generator().manual_seed(3), output_type="latent",
                 strength=0.8, num_inference_steps=8).images  # fmt: skip
    options = TorchOptions(device="cuda", dtype="fp16", step_graphs=True, **{switch: True})
    tuned = Img2ImgPipeline.from_components(on_gpu, options, show_progress=False)
    got = tuned("a", _image(), generator=torch.Generator().manual_seed(3), output_type="latent",
                strength=0.8, num_inference_steps=8).images  # fmt: skip
    assert float((got - want).norm() / want.norm()) <= 1e-3
    torch._dynamo.reset()


@cuda
def test_every_scheduler_on_cuda_equals_diffusers_on_cuda(tiny):
    """The memoised schedulers step CUDA tensors with CPU-held factors: the same numbers as
    diffusers' pipeline on the GPU (fp32; a bound, not 0.0, for GPU kernels' run-to-run
    freedom)."""
    on_gpu = _own(tiny)
    run = dict(strength=0.8, num_inference_steps=8, guidance_scale=7.5, output_type="np")
    for name in SCHEDULERS:
        ours = Img2ImgPipeline.from_components(
            on_gpu, TorchOptions(device="cuda"), scheduler=name, show_progress=False
        )
        reference = diffusers_img2img(on_gpu, name).to("cuda")
        got = ours("a dancer", _image(), generator=torch.Generator().manual_seed(6), **run)
        want = reference("a dancer", _image(), generator=torch.Generator().manual_seed(6), **run)
        assert float(np.abs(got.images - want.images).max()) <= 1e-5, name


@cuda
def test_stage_timer_times_gpu_calls_with_events():
    """The bench's stage clock on a GPU: no wait per call, the events' times added once
    settled, and their sum within the synchronised wall time of the calls."""
    import time

    from sdtrt.bench.timing import StageTimer

    timer = StageTimer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    matmul = timer.wrap("mm", lambda: a @ a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        matmul()
    assert timer.totals["mm"] == 0 and timer.calls["mm"] == 20  # nothing read yet
    timer.settle()
    wall_ms = (time.perf_counter() - start) * 1e3
    assert 0 < timer.totals["mm"] <= wall_ms


@cuda
@pytest.mark.parametrize("scheduler", ["lms", "ddim", "euler_a"])
def test_serve_steps_do_not_wait_for_the_gpu(tiny, scheduler):
    """The server's worker on CUDA: no step makes a synchronising call (PyTorch's sync
    debug mode raises on one; DDIM reads its timesteps from the host copy, as PNDM does,
    Euler A's noise comes from pinned memory), and a request served alone equals the
    pipeline on CUDA."""
    import PIL.Image

    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.jobs import Img2ImgRequest

    pipe = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda"), scheduler=scheduler, show_progress=False
    )
    pixels = (_image()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    request = Img2ImgRequest(prompt="a", image=PIL.Image.fromarray(pixels), strength=0.75,
                             num_inference_steps=8, seed=4, scheduler=scheduler)  # fmt: skip
    want = pipe("a", request.image, strength=0.75, num_inference_steps=8, output_type="np",
                generator=torch.Generator().manual_seed(4)).images[0]  # fmt: skip
    batcher = StepBatcher(pipe, start=False)
    batcher._unet_call = _no_sync(batcher._unet_call)  # one step of the worker
    rows: list[int] = []
    batcher.stats.on_unet_call.append(rows.append)
    future = batcher.submit(batcher.prepare(request))
    batcher.start()
    try:
        result = future.result(timeout=120)
    finally:
        batcher.close()
    assert rows == [2] * 6 and result.unet_calls == 6
    np.testing.assert_allclose(result.array, want, atol=1e-6)


@cuda
@pytest.mark.parametrize("preview_vae", [None, "sdtrt/assets/tiny-taesd"])
def test_serve_previews_do_not_wait_for_the_gpu(tiny, preview_vae):
    """A step's previews are decoded, rounded to 8 bits and copied to the host without a
    synchronising call (sync debug mode raises on one), and handed on once the GPU is
    through that step: each asked-for step's pictures, in order."""
    import PIL.Image

    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.jobs import Img2ImgRequest
    from sdtrt.serve.options import ServeOptions

    pipe = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda"), scheduler="euler", show_progress=False
    )
    request = Img2ImgRequest(image=PIL.Image.new("RGB", (48, 32)), strength=1.0,
                             num_inference_steps=8, seed=1, scheduler="euler")  # fmt: skip
    batcher = StepBatcher(pipe, ServeOptions(preview_vae=preview_vae), start=False)
    batcher._unet_call = _no_sync(batcher._unet_call)
    batcher._preview = _no_sync(batcher._preview)
    told: list[tuple[int, int, tuple[int, int]]] = []
    job = batcher.prepare(request)
    job.progress = lambda done, steps, images=None: (
        images and told.append((done, steps, images[0].size))
    )
    job.preview_steps = frozenset({2, 3, 6})
    future = batcher.submit(job)
    batcher.start()
    try:
        assert future.result(timeout=120).unet_calls == 8
    finally:
        batcher.close()
    assert told == [(2, 8, (48, 32)), (3, 8, (48, 32)), (6, 8, (48, 32))]


@cuda
def test_serve_fails_a_nan_job_within_run_ahead_steps_without_waiting(tiny):
    """On CUDA the worker reads a step's finiteness flags (copied to pinned memory without a
    synchronising call: sync debug mode raises on one) once the GPU is through that step:
    a job whose UNet answers NaN fails after RUN_AHEAD UNet calls, not its 12."""
    import PIL.Image

    from sdtrt.errors import NonFiniteOutputError
    from sdtrt.serve.batcher import RUN_AHEAD, StepBatcher
    from sdtrt.serve.jobs import Img2ImgRequest

    pipe = Img2ImgPipeline.from_components(
        _own(tiny), TorchOptions(device="cuda"), show_progress=False
    )
    unet, calls = pipe.backend.unet, []

    def nan_unet(sample, timestep, hidden):
        calls.append(len(sample))
        return unet(sample, timestep, hidden) * float("nan")

    pipe.backend.unet = nan_unet
    request = Img2ImgRequest(image=PIL.Image.new("RGB", (48, 32)), strength=1.0,
                             num_inference_steps=12, seed=1)  # fmt: skip
    batcher = StepBatcher(pipe, start=False)
    batcher._unet_call = _no_sync(batcher._unet_call)
    future = batcher.submit(batcher.prepare(request))
    batcher.start()
    try:
        with pytest.raises(NonFiniteOutputError, match="denoising loop"):
            future.result(timeout=120)
    finally:
        batcher.close()
    assert calls == [2] * RUN_AHEAD


@cuda
def test_profile_shows_one_graph_launch_per_step(tiny, tmp_path, monkeypatch):
    """bench --profile on a real GPU trace: the eager loop launches its kernels one by one,
    the step-graph loop launches one graph per step and keeps the GPU busier."""
    from sdtrt.bench.benchmark import BenchConfig, run_bench

    components = _own(tiny)
    monkeypatch.setattr("sdtrt.models.load_components", lambda source: components)
    config = BenchConfig(
        backends=("torch", "torch+step-graphs"), device="cuda", height=32, width=32, steps=10,
        warmup=1, repeats=1, profile=str(tmp_path),
    )  # fmt: skip
    plain, stepped = (r["profile"] for r in run_bench(config, log=lambda line: None)["results"])
    assert plain["steps"] == stepped["steps"] == 8
    assert plain["gpu_busy_ms"] > 0 and plain["kernel_launches_per_step"] > 20
    assert plain["graph_launches_per_step"] == 0
    assert stepped["graph_launches_per_step"] == 1 and stepped["kernel_launches_per_step"] <= 2
    assert stepped["gpu_busy_fraction"] > plain["gpu_busy_fraction"]


def _ranges():
    return BuildRanges(batch=(1, 2), height=(32, 64), width=(32, 64), opt_height=32, opt_width=48)


def _trt_pipeline(exported, engine_dir, cuda_graphs=False):
    options = TensorRTOptions(engine_dir=str(engine_dir), cuda_graphs=cuda_graphs)
    return Img2ImgPipeline.from_pretrained(exported.root, options, show_progress=False)


@pytest.fixture(scope="module")
def engines(exported_fp16, tmp_path_factory):
    from sdtrt.engine.trt_build import build_engines
    from sdtrt.options import BuildOptions

    engine_dir = tmp_path_factory.mktemp("engines")
    paths = build_engines(exported_fp16, "fp16", BuildOptions(ranges=_ranges()), engine_dir)
    return exported_fp16, engine_dir, paths


@tensorrt
def test_engines_match_torch_per_network(engines, tiny):
    from sdtrt.engine.trt_backend import TensorRTBackend
    from sdtrt.export.networks import networks_for

    exported, engine_dir, _ = engines
    backend = TensorRTBackend(exported, TensorRTOptions(engine_dir=str(engine_dir)))
    for name, network in networks_for(exported.dims).items():
        inputs = network.sample_inputs("fp16", 1, 32, 48, seed=3)
        got = backend.networks[name](**{k: v.cuda() for k, v in inputs.items()}).float().cpu()
        wrapper = network.wrap(tiny[network.component]).eval()
        with torch.no_grad():
            want = wrapper(*[v.float() if v.is_floating_point() else v for v in inputs.values()])
        rel = float((got - want).norm() / want.norm())
        assert rel <= THRESHOLDS["fp16"].rel_l2, (name, rel)


@tensorrt
def test_tensorrt_img2img_psnr_and_cuda_graphs(engines, tiny):
    exported, engine_dir, _ = engines
    trt_pipe = _trt_pipeline(exported, engine_dir)
    graphed = _trt_pipeline(exported, engine_dir, cuda_graphs=True)
    cpu = Img2ImgPipeline.from_components(tiny, show_progress=False)
    got = trt_pipe("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    replayed = graphed("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    want = cpu("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    assert compare_images(got, want, "fp16").passed
    np.testing.assert_array_equal(got, replayed)


@tensorrt
def test_tensorrt_runs_an_unguided_request_one_row_per_image(engines, tiny):
    """guidance_scale 1: the UNet gets B rows, which the profile's 2B axis takes from B."""
    exported, engine_dir, _ = engines
    run = dict(RUN, guidance_scale=1.0)
    got = _trt_pipeline(exported, engine_dir)(
        "a", _image(), generator=torch.Generator().manual_seed(4), **run
    ).images
    cpu = Img2ImgPipeline.from_components(tiny, show_progress=False)
    want = cpu("a", _image(), generator=torch.Generator().manual_seed(4), **run).images
    assert compare_images(got, want, "fp16").passed


@tensorrt
def test_static_engines_pad_a_call_of_fewer_rows(engines, tmp_path):
    """Engines built --static for 2 images at 32x48 take 4 UNet rows and 2 text or VAE rows:
    one unguided image (1 row each) runs padded, its image the dynamic engines' (fp16's
    bound), and the padding leaves the call's own rows as they are."""
    from sdtrt.engine.trt_build import build_engines
    from sdtrt.options import BuildOptions

    exported, engine_dir, _ = engines
    static = BuildRanges(batch=(2, 2), height=(32, 32), width=(48, 48), static=True)
    build_engines(exported, "fp16", BuildOptions(ranges=static), tmp_path)
    run = dict(RUN, guidance_scale=1.0)
    padded, dynamic = (
        _trt_pipeline(exported, folder)("a", _image(), generator=torch.Generator().manual_seed(4),
                                        **run).images
        for folder in (tmp_path, engine_dir)
    )  # fmt: skip
    assert compare_images(padded, dynamic, "fp16").passed
    unet = _trt_pipeline(exported, tmp_path).backend
    hidden = torch.randn(4, 77, exported.dims.text_hidden_size, device="cuda")
    sample = torch.randn(4, 4, 4, 6, device="cuda")
    whole = unet.unet(sample, torch.tensor(500.0), hidden)
    one = unet.unet(sample[:1], torch.tensor(500.0), hidden[:1])
    assert one.shape == (1, 4, 4, 6)
    assert float((one - whole[:1]).abs().max()) <= 1e-2


@tensorrt
@pytest.mark.parametrize("scheduler", ["lms", "pndm", "euler_a"])
def test_tensorrt_step_graphs_equal_its_eager_loop(engines, scheduler):
    """The engine's enqueue captured inside whole-step graphs: the loop's result as the
    eager TensorRT loop's (one engine, so only the scheduler math's order could differ);
    with a guidance cutoff too (a second capture on the B rows the profile takes)."""
    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    exported, engine_dir, _ = engines
    eager, graphed = (
        Img2ImgPipeline.from_pretrained(
            exported.root,
            TensorRTOptions(engine_dir=str(engine_dir), step_graphs=graphs),
            scheduler=scheduler,
            show_progress=False,
        )
        for graphs in (False, True)
    )
    a, b = (
        pipe("a", _image(), generator=torch.Generator().manual_seed(4), output_type="latent",
             strength=0.9, num_inference_steps=8).images
        for pipe in (eager, graphed)
    )  # fmt: skip
    assert float((a - b).norm() / a.norm()) <= 1e-5
    assert len(graphed.step_graphs.captured) == 1
    a, b = (
        pipe("a", _image(), generator=torch.Generator().manual_seed(4), output_type="latent",
             strength=0.9, num_inference_steps=8,
             callback_on_step_end=GuidanceCutoffCallback(cutoff_step_ratio=0.5)).images
        for pipe in (eager, graphed)
    )  # fmt: skip
    assert float((a - b).norm() / a.norm()) <= 1e-5
    assert len(graphed.step_graphs.captured) == 2


@tensorrt
def test_tensorrt_outputs_belong_to_the_caller(engines):
    """A second UNet call must not change the first's result (PNDM keeps model outputs)."""
    exported, engine_dir, _ = engines
    backend = _trt_pipeline(exported, engine_dir).backend
    hidden = torch.randn(2, 77, exported.dims.text_hidden_size, device="cuda")
    first = backend.unet(torch.randn(2, 4, 4, 6, device="cuda"), torch.tensor(500.0), hidden)
    kept = first.clone()
    backend.unet(torch.randn(2, 4, 4, 6, device="cuda"), torch.tensor(10.0), hidden)
    assert torch.equal(first, kept)


@tensorrt
def test_request_outside_profile_is_refused(engines):
    from sdtrt.errors import ShapeOutsideProfileError

    exported, engine_dir, _ = engines
    pipe = _trt_pipeline(exported, engine_dir)
    with pytest.raises(ShapeOutsideProfileError, match="heights 32-64 and widths 32-64 px"):
        pipe("a", torch.rand(1, 3, 128, 128), num_inference_steps=2)
    assert pipe.backend.pixel_range == ((32, 64), (32, 64))
    # The rows one call takes, as a server reads them: 2B for the UNet, B for the others.
    batch = _ranges().batch[1]
    assert (pipe.backend.max_unet_rows, pipe.backend.max_image_rows) == (2 * batch, batch)


@tensorrt
def test_changed_graph_hash_triggers_rebuild(engines, tmp_path):
    import json
    import shutil

    from sdtrt.engine.trt_build import build_engines
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import BuildOptions

    exported, engine_dir, paths = engines
    root = shutil.copytree(exported.root, tmp_path / "copy")
    manifest = json.loads((root / "sdtrt.json").read_text())
    file = manifest["precisions"]["fp16"]["text_encoder"]["file"]
    manifest["graphs"][file]["sha256"]["model_fp16.onnx"] = "0" * 64
    (root / "sdtrt.json").write_text(json.dumps(manifest))
    changed = ExportedModel(
        root, manifest, _verified={file}
    )  # skip the file check: the hash is the test
    new = build_engines(
        changed, "fp16", BuildOptions(ranges=_ranges()), engine_dir, ("text_encoder",)
    )
    assert new["text_encoder"] != paths["text_encoder"]


def _rtx_skip_reason() -> str | None:
    from sdtrt.engine.trt_family import RTX_PORTABLE, family_version, runs_on

    if not HAS_CUDA:
        return "no CUDA GPU on this machine"
    if family_version("tensorrt-rtx") is None:
        return "TensorRT-RTX is not installed (pip install 'sdtrt[rtx]')"
    major, minor = torch.cuda.get_device_capability()
    if not runs_on(",".join(RTX_PORTABLE), f"{major}.{minor}"):
        return f"TensorRT-RTX does not run on compute capability {major}.{minor} (this GPU)"
    return None


@pytest.mark.skipif(_rtx_skip_reason() is not None, reason=str(_rtx_skip_reason()))
def test_tensorrt_rtx_img2img_matches_torch(exported_fp16, tiny, tmp_path):
    """RTX engines built ahead of time (portable targets), JIT-compiled on this GPU: the
    image within the fp16 thresholds of the torch CPU reference; the runtime cache is
    written after the first request."""
    from sdtrt.engine.trt_build import build_engines
    from sdtrt.options import BuildOptions

    engines = tmp_path / "rtx"
    build_engines(exported_fp16, "fp16", BuildOptions(ranges=_ranges()), engines,
                  family="tensorrt-rtx")  # fmt: skip
    options = TensorRTOptions(family="tensorrt-rtx", engine_dir=str(engines))
    pipe = Img2ImgPipeline.from_pretrained(exported_fp16.root, options, show_progress=False)
    cpu = Img2ImgPipeline.from_components(tiny, show_progress=False)
    got = pipe("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    want = cpu("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    assert compare_images(got, want, "fp16").passed
    assert list(engines.glob("*.runtime-cache"))
    # Whole steps captured around the engine's enqueue (built capturable, its kernels
    # specialised eagerly before the capture): the eager loop's image.
    stepped = Img2ImgPipeline.from_pretrained(
        exported_fp16.root, replace(options, step_graphs=True), show_progress=False
    )
    replayed = stepped("a", _image(), generator=torch.Generator().manual_seed(4), **RUN).images
    assert float(np.abs(replayed - got).max()) <= 1 / 255
