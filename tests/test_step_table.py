"""The denoising step as a table (runtime/step_table.py) and a function of device tensors
(runtime/step_graph.py): what a CUDA graph replays. On the CPU its loop runs eagerly; it
must equal the eager loop bit for bit, read nothing back to the host, and depend on the
step only through its device tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.step_graph import StepState, run_table, table_step
from sdtrt.runtime.step_table import StepTable, tabulate
from sdtrt.runtime.steps import start_timesteps

TABULATED = (
    "lms", "euler", "ddim", "dpmpp_2m", "pndm", "euler_a", "unipc", "lms_karras",
    "dpmpp_2m_karras", "ddim_trailing", "lcm",
)  # fmt: skip
RUN = dict(num_inference_steps=10, guidance_scale=5.0, output_type="latent")


def _pipelines(components, scheduler):
    eager = Img2ImgPipeline.from_components(components, scheduler=scheduler, show_progress=False)
    tabled = Img2ImgPipeline.from_components(components, scheduler=scheduler, show_progress=False)
    # What --step-graphs gives on a GPU; on the CPU the same steps run eagerly.
    tabled.backend.step_unet = tabled.backend.unet
    return eager, tabled


@pytest.mark.parametrize("scheduler", TABULATED)
@pytest.mark.parametrize("model", ["tiny", "tiny_random"])  # v-prediction, epsilon
def test_tabulated_loop_equals_the_eager_loop(request, model, scheduler, images):
    components = request.getfixturevalue(model)
    eager, tabled = _pipelines(components, scheduler)
    tables = []
    make_table = tabled._step_table
    tabled._step_table = lambda *args: tables.append(make_table(*args)) or tables[-1]
    for strength in (1.0, 0.45):
        eager_run, tabled_run = _seeded(RUN, 3), _seeded(RUN, 3)
        want = eager("a red circle", images[0], strength=strength, **eager_run)
        got = tabled("a red circle", images[0], strength=strength, **tabled_run)
        assert tables[-1] is not None and got.unet_calls == want.unet_calls  # a table ran
        np.testing.assert_array_equal(got.images.numpy(), want.images.numpy())
        # As many draws as diffusers' loop (LCM's last step draws none): a caller's next
        # image from the same generator is diffusers' next one too.
        assert torch.equal(tabled_run["generator"].get_state(), eager_run["generator"].get_state())


@pytest.mark.parametrize("scheduler", TABULATED)
def test_a_guidance_cutoff_is_tabulated_and_equals_its_callback(tiny, images, scheduler):
    """sdtrt's GuidanceCutoffCallback does not turn the tabulated loop (--step-graphs) into
    the eager one: the steps up to the cutoff run on [uncond, cond], the rest on the cond
    half, carrying on from the first run's state (history, index, noise rows). The eager
    loop's image with the callback called, bit for bit, two images; the guidance it leaves
    is the callback's. diffusers' SDCFGCutoffCallback for one image likewise."""
    from diffusers.callbacks import SDCFGCutoffCallback

    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    eager, tabled = _pipelines(tiny, scheduler)
    tables, rows = [], []
    make_table = tabled._step_table
    tabled._step_table = lambda *args: tables.append(make_table(*args)) or tables[-1]
    unet = tabled.backend.unet
    tabled.backend.unet = lambda x, t, texts: rows.append(len(x)) or unet(x, t, texts)
    tabled.backend.step_unet = tabled.backend.unet
    run = {**RUN, "callback_on_step_end": GuidanceCutoffCallback(cutoff_step_ratio=0.3)}
    eager_run, tabled_run = _seeded(run, 3), _seeded(run, 3)
    want = eager(["a red circle", "a cat"], images, strength=0.9, **eager_run)
    got = tabled(["a red circle", "a cat"], images, strength=0.9, **tabled_run)
    assert tables[-1] is not None  # a table ran, not the callback's eager loop
    calls = want.unet_calls  # 9 (PNDM: 10, its first step twice)
    guided = int(calls * 0.3) + 1
    assert rows == [4] * guided + [2] * (calls - guided)
    np.testing.assert_array_equal(got.images.numpy(), want.images.numpy())
    assert torch.equal(tabled_run["generator"].get_state(), eager_run["generator"].get_state())
    assert tabled.guidance_scale == eager.guidance_scale == 0.0
    # diffusers' own cutoff, for one image (its last text row is the cond half): tabulated.
    tables.clear()
    run["callback_on_step_end"] = SDCFGCutoffCallback(cutoff_step_ratio=0.3)
    want = eager("a cat", images[0], strength=0.9, **_seeded(run, 4))
    got = tabled("a cat", images[0], strength=0.9, **_seeded(run, 4))
    assert tables[-1] is not None
    np.testing.assert_array_equal(got.images.numpy(), want.images.numpy())


def test_the_tabulated_cutoff_guides_the_steps_its_callback_would():
    """What the tabulated loop runs in place of a cutoff callback (``tabulated_cutoff``) is
    where calling it turns guidance off, for ratios and indices, those at no step included:
    sdtrt's callback, and diffusers' for one image; other callbacks are called."""
    from types import SimpleNamespace

    from diffusers.callbacks import SDCFGCutoffCallback

    from sdtrt.runtime.callbacks import tabulated_cutoff
    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    cutoffs = [dict(cutoff_step_ratio=r) for r in (0.0, 0.25, 0.5, 0.99, 1.0)]
    cutoffs += [dict(cutoff_step_ratio=None, cutoff_step_index=i) for i in (-1, 0, 2, 5, 9)]
    for kind in (GuidanceCutoffCallback, SDCFGCutoffCallback):
        for kwargs in cutoffs:
            callback = kind(**kwargs)
            for steps in range(1, 8):
                pipe = SimpleNamespace(num_timesteps=steps, _guidance_scale=7.5)
                pipe.do_classifier_free_guidance = True
                guided = steps
                for i in range(steps):
                    callback(pipe, i, None, {"prompt_embeds": torch.zeros(2, 1)})
                    if pipe._guidance_scale == 0.0:
                        pipe.do_classifier_free_guidance = False
                        guided = min(guided, i + 1)
                assert tabulated_cutoff(callback, steps, 1) == guided, (kind, kwargs, steps)
    assert tabulated_cutoff(SDCFGCutoffCallback(cutoff_step_ratio=0.5), 8, 2) is None
    assert tabulated_cutoff(lambda *args: {}, 8, 1) is None


@pytest.mark.parametrize("case", ["order-3", "sde", "tcd"])
def test_a_step_not_tabulated_runs_the_eager_loop(tiny, images, case):
    """DPM-Solver++ of order 3 (a diffusers option; Stable Diffusion runs order 2), the
    SDE solver (dpmpp_2m_sde_karras, which draws noise each step) and TCD have no table:
    the pipeline runs the eager loop, with the same result."""
    name = {"order-3": "dpmpp_2m", "sde": "dpmpp_2m_sde_karras", "tcd": "tcd"}[case]
    eager, tabled = _pipelines(tiny, name)
    if case == "order-3":
        for pipe in (eager, tabled):
            config = {**pipe.scheduler.config, "solver_order": 3}
            config.pop("_use_default_values", None)  # else from_config takes order 2 back
            pipe.scheduler = type(pipe.scheduler).from_config(config)
    timesteps = start_timesteps(tabled.scheduler, 10, 2, "cpu")
    assert tabulate(tabled.scheduler, timesteps, torch.zeros(1, 4, 4, 6)) is None
    want = eager("a", images[0], strength=0.6, **_seeded(RUN, 1))
    got = tabled("a", images[0], strength=0.6, **_seeded(RUN, 1))
    assert tabled.step_graphs is not None  # asked for, and not used
    np.testing.assert_array_equal(got.images.numpy(), want.images.numpy())


def _seeded(run, seed):
    return {**run, "generator": torch.Generator().manual_seed(seed)}


class _NoHostReads(TorchDispatchMode):
    """Fails on any operation that reads a tensor's value back to the host (``.item()``,
    ``int()``, ``bool()``, data-dependent shapes): on a GPU each one synchronises, and a
    CUDA graph capture refuses it."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.FORBIDDEN:
            raise AssertionError(f"{func} reads a tensor back to the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", TABULATED)
def test_one_step_function_serves_every_step_without_host_reads(tiny, scheduler):
    """What a graph replays: the same call, with the same Python arguments, N times. Run so
    here (under a mode that refuses host reads), it must give the eager loop's latents: the
    step then depends on its index only through the state's device tensors."""
    pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    timesteps = start_timesteps(pipe.scheduler, 12, 3, "cpu")
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * 4
    table = tabulate(pipe.scheduler, timesteps, latents, generator)
    hidden = pipe.backend.encode_text(torch.randint(0, 100, (2, 77), generator=generator))
    want = run_table(table, latents, hidden, 4.0, pipe.backend.unet)
    state = StepState.like(table, latents, hidden, rows=1000)
    with torch.inference_mode():
        state.load(table, latents, hidden, 4.0)
        with _NoHostReads():
            for _ in range(len(table)):
                table_step(table.kind, state, pipe.backend.unet, True)
    assert int(state.index) == len(table) == len(timesteps)
    np.testing.assert_array_equal(state.latents.numpy(), want.numpy())


@pytest.mark.parametrize("scheduler", TABULATED)
def test_the_step_keeps_every_tensor_on_the_latents_device(tiny, scheduler):
    """On a GPU every tensor the captured step touches must live there: a CPU tensor in it
    fails (or copies, and waits) on CUDA but not in a CPU test. PyTorch's meta device stands
    in for the GPU: no data, and an operation mixing it with a CPU tensor raises."""
    import copy

    pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    table = tabulate(
        pipe.scheduler, start_timesteps(pipe.scheduler, 12, 3, "cpu"), latents, generator
    )
    on_meta = StepTable(
        table.kind,
        table.values.to("meta"),
        table.timesteps.to("meta"),
        None if table.noise is None else table.noise.to("meta"),
    )
    backend = pipe.backend
    backend.unet_call = copy.deepcopy(tiny["unet"]).to("meta")
    hidden = torch.empty(2, 77, backend.unet_call.config.cross_attention_dim, device="meta")
    state = StepState.like(on_meta, latents.to("meta"), hidden, rows=1000)
    with torch.inference_mode():
        state.load(on_meta, latents.to("meta"), hidden, 4.0)
        for _ in range(len(on_meta)):  # the UNet call step graphs capture (step_unet)
            table_step(on_meta.kind, state, backend._unet_eager, True)
    assert state.latents.device.type == "meta" and state.latents.shape == latents.shape


def test_the_meta_device_refuses_a_cpu_tensor():
    with pytest.raises(RuntimeError, match="not on the expected device"):
        torch.ones(2, device="meta") + torch.ones(2)


def test_the_host_read_guard_catches_one():
    with pytest.raises(AssertionError, match="host"), _NoHostReads():
        int(torch.ones(1).sum())


class _Replayed:
    """A CUDA graph's stand-in on the CPU: a replay calls the captured step again on the same
    state tensors (a real replay runs the same kernels on the same memory; what Python
    computed at capture is frozen there, which the test above rules out)."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step()


@pytest.fixture
def fake_captures(monkeypatch):
    """StepGraphs captures on the CPU: each capture a ``_Replayed``; the steps captured and
    the memory pools they were given are listed."""
    from sdtrt.runtime import step_graph

    captured, pools = [], set()

    def fake_capture(step, pool):
        step()  # the warm run: capture() runs the step once first, too
        captured.append(step)
        pools.add(id(pool))
        return _Replayed(step), None

    monkeypatch.setattr(step_graph, "capture", fake_capture)
    monkeypatch.setattr(step_graph.StepGraphs, "capturable", staticmethod(lambda latents: True))
    return captured, pools


def test_a_guidance_cutoff_replays_a_second_capture_from_the_firsts_state(tiny, fake_captures):
    """Captures faked: a cutoff's steps after it replay a capture on the cond half of the
    text batch, started from the first capture's latents, history and step; the eager
    tabulated loop's latents, bit for bit (DPM++ 2M keeps a history, Euler a draws)."""
    from sdtrt.runtime.step_graph import StepGraphs

    captured, _ = fake_captures
    generator = torch.Generator().manual_seed(8)
    for scheduler in ("dpmpp_2m", "euler_a"):
        pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
        hidden = pipe.backend.encode_text(torch.randint(0, 100, (4, 77), generator=generator))
        graphs, latents = StepGraphs(pipe.backend.unet), torch.randn(2, 4, 8, 8)
        timesteps = start_timesteps(pipe.scheduler, 10, 1, "cpu")
        table = tabulate(pipe.scheduler, timesteps, latents, torch.Generator().manual_seed(1))
        want = run_table(table, latents, hidden, 6.0, pipe.backend.unet, guided=4)
        before = len(captured)
        got = graphs.run(table, latents, hidden, 6.0, guided=4)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        assert len(captured) == before + 2  # [uncond, cond] rows, then the cond rows
        guided_throughout = run_table(table, latents, hidden, 6.0, pipe.backend.unet)
        assert not torch.equal(want, guided_throughout)


def test_captures_are_reused_resized_and_dropped(tiny, monkeypatch, fake_captures):
    """StepGraphs' bookkeeping, captures faked: one capture serves schedules of any length
    and guidance scale of its kind and shapes; an ancestral kind, whose noise rows are
    sized to its schedule, is captured again for a longer one; beyond ``max_captures``
    the least recently used goes."""
    from sdtrt.runtime import step_graph

    captured, pools = fake_captures
    monkeypatch.setattr(step_graph.StepGraphs, "max_captures", 2)
    generator = torch.Generator().manual_seed(8)
    pipe = Img2ImgPipeline.from_components(tiny, scheduler="euler_a", show_progress=False)
    hidden = pipe.backend.encode_text(torch.randint(0, 100, (2, 77), generator=generator))
    graphs = step_graph.StepGraphs(pipe.backend.unet)

    def check(scheduler, steps, start, size, guidance, captures):
        latents = torch.randn(1, 4, *size, generator=generator)
        timesteps = start_timesteps(scheduler, steps, start, "cpu")
        table = tabulate(scheduler, timesteps, latents, torch.Generator().manual_seed(1))
        want = run_table(table, latents, hidden, guidance, pipe.backend.unet)
        got = graphs.run(table, latents, hidden, guidance)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        assert len(captured) == captures

    ancestral = pipe.scheduler
    check(ancestral, 10, 2, (8, 8), 3.0, 1)
    check(ancestral, 10, 6, (8, 8), 7.5, 1)  # shorter: the same capture
    check(ancestral, 14, 2, (8, 8), 7.5, 2)  # longer than its noise rows: captured again
    lms = Img2ImgPipeline.from_components(tiny, scheduler="lms", show_progress=False).scheduler
    check(lms, 20, 0, (8, 8), 5.0, 3)
    check(lms, 40, 5, (8, 8), 5.0, 3)  # a deterministic kind indexes up to 1000 rows
    check(lms, 10, 0, (4, 6), 5.0, 4)  # other shapes: a third key, the oldest goes
    assert len(graphs.captured) == 2
    check(lms, 10, 0, (8, 8), 5.0, 4)  # lms 8x8 was used more recently than euler_a 8x8
    check(ancestral, 10, 2, (8, 8), 3.0, 5)  # euler_a's was dropped: captured again
    assert len(pools) == 1  # every capture, of every kind and shape, in one memory pool


@pytest.mark.parametrize("scheduler", ["unipc", "euler_a"])
def test_a_schedule_seen_before_reuses_its_rows(tiny, scheduler, monkeypatch):
    """The rows of a schedule are computed once (host work: UniPC's took 13 ms a request
    on the development CPU) and reused for the same steps and start; any other schedule,
    or start, computes its own. Euler A's noise is drawn anew each time."""
    from sdtrt.runtime import scheduler_memo, step_table

    scheduler_memo.shared_memo.cache_clear()  # earlier tests' memos
    computed = []
    real_rows = step_table._rows
    monkeypatch.setattr(
        step_table, "_rows", lambda *args: computed.append(args[3:]) or real_rows(*args)
    )
    pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    sched = pipe.scheduler
    latents = torch.zeros(1, 4, 8, 8)

    def table(steps, start, seed=0):
        timesteps = start_timesteps(sched, steps, start, "cpu")
        return tabulate(sched, timesteps, latents, torch.Generator().manual_seed(seed))

    first = table(10, 2)
    again = table(10, 2, seed=1)
    assert len(computed) == 1 and torch.equal(again.values, first.values)
    fresh = real_rows(sched, start_timesteps(sched, 10, 2, "cpu"), first.kind.prediction, 2, True)
    assert fresh is not None and torch.equal(fresh[1], first.values)
    if first.kind.noise:
        assert not torch.equal(again.noise, first.noise)
    for steps, start in ((12, 2), (10, 5)):
        other = table(steps, start)
        assert len(other) == steps - start
    assert len(computed) == 3
    assert len(table(10, 2)) == 8 and len(computed) == 3  # still in the memo
