"""`sdtrt bench` on the tiny model: every requested backend has a row with the right
fields and call count, the JSON and the PNG are written, a backend that cannot run is
reported as skipped. No speed is asserted here: speed is the benchmark's job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtrt.bench.benchmark import BenchConfig, run_bench
from sdtrt.bench.report import markdown_table
from sdtrt.cli import main
from sdtrt.errors import InvalidInputError
from sdtrt.options import TorchOptions

STAGES = {"text_encoder", "vae_encoder", "unet_per_call", "loop_overhead_per_step", "vae_decoder"}


def test_bench_cli_writes_json_and_png(
    exported, onnx_cache, tmp_path, capsys, monkeypatch, recwarn
):
    monkeypatch.setenv("SDTRT_CACHE", str(onnx_cache))  # reuse the session's export
    args = [
        "bench", "--model", "tiny", "--backends", "torch,onnxruntime,tensorrt,diffusers",
        "--batch", "1,2", "--height", "32", "--width", "48", "--steps", "6",
        "--strength", "0.5", "--warmup", "1", "--repeats", "2",
        "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"),
    ]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "cores", "gpu", "versions", "git_commit", "python"} <= set(record["environment"])
    assert record["config"]["steps"] == 6 and record["config"]["batches"] == [1, 2]
    rows = [r for r in record["results"] if r["status"] == "ok"]
    assert sorted((r["backend"], r["batch"]) for r in rows) == [
        ("diffusers", 1), ("diffusers", 2), ("onnxruntime", 1), ("onnxruntime", 2),
        ("torch", 1), ("torch", 2),
    ]  # fmt: skip
    for r in rows:
        assert r["unet_calls"] == 3  # 6 steps at strength 0.5
        assert set(r["stages_ms"]) == STAGES and all(v >= 0 for v in r["stages_ms"].values())
        assert r["stages_ms"]["unet_per_call"] > 0
        e2e = r["end_to_end_ms"]
        assert len(e2e["samples"]) == 2 and e2e["p50"] <= e2e["p90"] <= e2e["p99"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / (e2e["p50"] / 1e3))
        assert r["unet_batching"]["one_2b_call_ms"] > 0
    (skipped,) = [r for r in record["results"] if r["status"] == "skipped"]
    assert skipped["backend"] == "tensorrt" and "TensorRT" in skipped["reason"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| torch | 1 | 3 |" in out and "| diffusers | 2 | 3 |" in out and "1.00x" in out
    # diffusers' num_images_per_prompt path warns about its own repeat of the image
    assert not [w for w in recwarn if "You have passed" in str(w.message)]


def test_markdown_table_names_skipped_backends():
    record = {"results": [{"backend": "tensorrt", "status": "skipped", "reason": "no GPU"}]}
    assert "| tensorrt | skipped: no GPU |" in markdown_table(record)


def test_bad_config_is_refused():
    with pytest.raises(InvalidInputError, match="backends must be among"):
        BenchConfig(backends=("jax",))
    with pytest.raises(InvalidInputError, match="batch sizes must be >= 1"):
        BenchConfig(batches=(0,))
    with pytest.raises(InvalidInputError, match="steps must be >= 1, got 0"):
        BenchConfig(steps=0)  # was a ZeroDivisionError
    with pytest.raises(InvalidInputError, match="--step-graphs applies to the torch and Tens"):
        BenchConfig(backends=("onnxruntime",), step_graphs=True)
    with pytest.raises(InvalidInputError, match="--compile applies to the torch backend"):
        BenchConfig(backends=("onnxruntime", "diffusers"), compile_unet=True)
    with pytest.raises(InvalidInputError, match="is a file: name a folder"):
        BenchConfig(profile=__file__)
    with pytest.raises(InvalidInputError, match=r"torch\+bogus: a torch row takes \+cuda-graphs"):
        BenchConfig(backends=("torch", "torch+bogus"))
    with pytest.raises(InvalidInputError, match="a diffusers row takes no switches"):
        BenchConfig(backends=("diffusers+compile",))
    with pytest.raises(InvalidInputError, match="--step-graphs needs --device cuda"):
        BenchConfig(backends=("torch+step-graphs",))


def test_rows_with_switches_run_side_by_side(monkeypatch, tiny):
    """torch rows with switches of their own, beside plain torch and diffusers in one run:
    each row its options; the switches that change the UNet in place do it on a copy."""
    import copy

    import torch

    from sdtrt.engine import torch_backend

    components = copy.deepcopy(tiny)
    monkeypatch.setattr("sdtrt.models.load_components", lambda source: components)
    monkeypatch.setattr(torch_backend, "COMPILE_BACKEND", "aot_eager")  # inductor: minutes here
    rows = ("torch", "torch+channels-last", "torch+fuse-qkv+compile", "diffusers")
    config = BenchConfig(backends=rows, height=32, width=32, steps=4, warmup=1, repeats=1)
    assert config.options_for("torch+fuse-qkv+compile") == TorchOptions(
        fuse_qkv=True, compile_unet=True
    )
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    record = run_bench(config, log=lambda line: None)
    torch._dynamo.reset()
    assert [r["backend"] for r in record["results"]] == list(rows)
    assert all(r["status"] == "ok" and r["unet_calls"] == 3 for r in record["results"])
    # The compiled row's UNet is called by the bench only as its run called it: one graph
    # (a B-row call, or another timestep shape or layout, would have compiled another).
    assert counters["stats"]["unique_graphs"] == 1
    compiled = record["results"][2]["unet_batching"]
    assert compiled["two_b_calls_ms"] is None and compiled["one_2b_call_ms"] > 0
    shared = components["unet"]
    assert all(p.is_contiguous() for p in shared.parameters())
    assert not any(hasattr(m, "to_qkv") for m in shared.modules())
    assert "| torch+fuse-qkv+compile | 1 | 3 |" in markdown_table(record)


def test_lcm_loras_recipe_runs_side_by_side_with_diffusers(monkeypatch, tiny):
    """`sdtrt bench --scheduler lcm --steps 4 --strength 0.5 --guidance 1`: both rows run
    LCM's two steps and get the guidance (1: the prompt row alone)."""
    import copy

    from sdtrt.bench import benchmark

    components = copy.deepcopy(tiny)
    monkeypatch.setattr("sdtrt.models.load_components", lambda source: components)
    calls = []
    options = benchmark._call_options
    monkeypatch.setattr(
        benchmark, "_call_options", lambda *a: calls.append(options(*a)) or calls[-1]
    )
    config = BenchConfig(
        backends=("torch", "diffusers"), height=32, width=32, steps=4, strength=0.5,
        scheduler="lcm", guidance=1.0, warmup=0, repeats=1,
    )  # fmt: skip
    record = run_bench(config, log=lambda line: None)
    assert [(r["status"], r["unet_calls"]) for r in record["results"]] == [("ok", 2)] * 2
    assert calls and {c["guidance_scale"] for c in calls} == {1.0}
    with pytest.raises(InvalidInputError, match="guidance"):
        BenchConfig(guidance=float("nan"))


def test_a_guidance_cutoff_runs_in_every_row(monkeypatch, tiny):
    """`sdtrt bench --guidance-cutoff 0.5`: sdtrt's rows and diffusers' run the same cutoff
    callback (diffusers' inside its own step-end hook), guidance off after step 1 of 3."""
    import copy

    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    components = copy.deepcopy(tiny)
    monkeypatch.setattr("sdtrt.models.load_components", lambda source: components)
    seen = []
    callback_fn = GuidanceCutoffCallback.callback_fn

    def spy(self, pipe, i, t, tensors):
        out = callback_fn(self, pipe, i, t, tensors)
        seen.append((type(pipe).__name__, i, pipe.do_classifier_free_guidance))
        return out

    monkeypatch.setattr(GuidanceCutoffCallback, "callback_fn", spy)
    config = BenchConfig(backends=("torch", "diffusers"), height=32, width=32, steps=4,
                         guidance_cutoff=0.5, warmup=0, repeats=1)  # fmt: skip
    record = run_bench(config, log=lambda line: None)
    assert [(r["status"], r["unet_calls"]) for r in record["results"]] == [("ok", 3)] * 2
    assert record["config"]["guidance_cutoff"] == 0.5
    for pipeline in ("Img2ImgPipeline", "StableDiffusionImg2ImgPipeline"):
        guided = [on for name, i, on in seen if name == pipeline]
        assert guided and guided == [True, False, False] * (len(guided) // 3), pipeline
    with pytest.raises(InvalidInputError, match="guidance cutoff must be a number in"):
        BenchConfig(guidance_cutoff=-1.0)


def test_run_bench_skips_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    record = run_bench(
        BenchConfig(backends=("torch",), device="cuda", height=32, width=32, steps=2, repeats=1),
        log=lambda line: None,
    )
    assert record["results"] == [
        {"backend": "torch", "status": "skipped", "reason": "no CUDA device on this machine"}
    ]


def test_graph_backends_export_the_fp32_weights_before_torch_moves_them(monkeypatch):
    """The torch target casts the shared modules to its dtype in place; a graph backend asked
    for after it must still export the fp32 weights, and the rows keep the asked order."""
    import torch

    from sdtrt.errors import BackendUnavailableError

    exported_dtypes = []

    def fake_export(components, **options):
        exported_dtypes.append(components["unet"].dtype)
        raise BackendUnavailableError("export stopped by the test")

    monkeypatch.setattr("sdtrt.export.cache.exported_for", fake_export)
    config = BenchConfig(
        backends=("torch", "onnxruntime"), dtype="fp16", height=32, width=32, steps=2,
        strength=1.0, warmup=0, repeats=1,
    )  # fmt: skip
    record = run_bench(config, log=lambda line: None)
    assert exported_dtypes == [torch.float32]
    assert [(r["backend"], r["status"]) for r in record["results"]] == [
        ("torch", "ok"), ("onnxruntime", "skipped"),
    ]  # fmt: skip
    with pytest.raises(InvalidInputError, match="more than once"):
        BenchConfig(backends=("torch", "torch"))


def test_diffusers_compile_row_compiles_a_copy_of_the_unet(monkeypatch, tiny_random):
    """The peer row: diffusers' pipeline with its UNet under torch.compile (here dynamo's
    eager backend: inductor takes 2 minutes on this CPU). It compiles a channels-last copy,
    so the shared UNet the other rows run is untouched, and the timers are taken off."""
    import copy

    import torch

    from sdtrt.bench import benchmark

    components = copy.deepcopy(tiny_random)
    compiled = []
    real_compile = torch.compile

    def spy_compile(module, **options):
        compiled.append((module, options))
        return real_compile(module, **options)

    monkeypatch.setattr("sdtrt.models.load_components", lambda source: components)
    monkeypatch.setattr(benchmark, "DIFFUSERS_COMPILE", {"backend": "eager", "fullgraph": True})
    monkeypatch.setattr(torch, "compile", spy_compile)
    config = BenchConfig(
        backends=("diffusers", "diffusers-compile"), height=32, width=32, steps=4, warmup=1,
        repeats=1,
    )  # fmt: skip
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    record = run_bench(config, log=lambda line: None)
    plain, peer = record["results"]
    assert (plain["status"], peer["status"]) == ("ok", "ok")
    assert peer["backend"] == "diffusers-compile" and peer["unet_calls"] == plain["unet_calls"] == 3
    # Called at the run's shapes only: one graph, no half-batch call compiling again.
    assert counters["stats"]["unique_graphs"] == 1
    assert peer["unet_batching"]["two_b_calls_ms"] is None
    assert plain["unet_batching"]["speedup"] > 0
    assert peer["first_run_ms"] > 0 and peer["stages_ms"]["unet_per_call"] > 0
    [(module, options)] = compiled
    assert module is not components["unet"] and options["fullgraph"]
    assert next(module.parameters()).is_contiguous(memory_format=torch.channels_last)
    shared = components["unet"]
    assert "forward" not in vars(shared) and "encode" not in vars(components["vae"])
    assert all(p.is_contiguous() for p in shared.parameters())
    table = markdown_table(record)
    assert "| diffusers-compile | 1 | 3 |" in table
    assert table.splitlines()[-1].split("|")[-3].strip() == "-"  # 1x2B vs 2xB: not measured
    torch._dynamo.reset()


def test_a_row_that_fails_is_reported_and_the_others_still_run(monkeypatch, tiny, tmp_path, capsys):
    """A row that raises while measured (a compiler missing, memory...) is a "failed" row
    with its reason; the rows after it run; the command exits 1 and names it."""
    from sdtrt.engine.torch_backend import TorchBackend

    def broken(self, *args):
        raise RuntimeError("inductor: no working C compiler found\nmore detail")

    monkeypatch.setattr("sdtrt.models.load_components", lambda source: tiny)
    monkeypatch.setattr(TorchBackend, "unet", broken)
    args = ["bench", "--backends", "torch,diffusers", "--height", "32", "--width", "32",
            "--steps", "4", "--warmup", "0", "--repeats", "1",
            "--json", str(tmp_path / "b.json")]  # fmt: skip
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "| torch | failed: RuntimeError: inductor: no working C compiler found |" in out
    assert "| diffusers | 1 | 3 |" in out and "failed while measured: torch" in err
    record = json.loads((tmp_path / "b.json").read_text())
    assert [r["status"] for r in record["results"]] == ["failed", "ok"]
    assert record["complete"] is True


def test_a_run_cut_short_keeps_the_rows_it_finished(monkeypatch, tiny, tmp_path):
    """--json is written after each row (complete: false until the last), so that a run
    stopped at a time limit (the device's) still leaves its finished rows, whole."""
    from sdtrt.fileio import write_json

    written = []

    def write_and_stop(path, record):
        write_json(path, record)
        written.append(json.loads(Path(path).read_text()))
        if len(written) == 2:  # stopped here, as a time limit would
            raise KeyboardInterrupt

    monkeypatch.setattr("sdtrt.models.load_components", lambda source: tiny)
    monkeypatch.setattr("sdtrt.fileio.write_json", write_and_stop)
    args = ["bench", "--backends", "torch,diffusers,torch+channels-last", "--height", "32",
            "--width", "32", "--steps", "4", "--warmup", "0", "--repeats", "1",
            "--json", str(tmp_path / "b.json")]  # fmt: skip
    assert main(args) == 130  # interrupted
    record = json.loads((tmp_path / "b.json").read_text())
    assert record == written[-1] and record["complete"] is False
    assert [(r["backend"], r["status"]) for r in record["results"]] == [
        ("torch", "ok"),
        ("diffusers", "ok"),
    ]
    assert [len(w["results"]) for w in written] == [1, 2]


def test_the_gpu_scripts_rows_are_valid_rows():
    """bench/gpu_check.sh runs on a lent GPU, in minutes counted: its stages and rows are
    checked here first (a misspelt row would cost a device call)."""
    import re
    import subprocess

    from sdtrt.bench.config import PEERS

    script = Path(__file__).parents[1] / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", "")
    stages = re.search(r'^STAGES="([^"]+)"', text, re.MULTILINE)
    assert stages is not None
    assert sorted(stages.group(1).split()) == sorted(re.findall(r"^stage_(\w+)\(\)", text, re.M))
    lists = re.findall(r"--backends\s+([\w+,-]+)", text)
    assert len(lists) == 6
    for rows in lists:
        config = BenchConfig(backends=tuple(rows.split(",")), device="cuda", dtype="fp16")
        for row in config.backends:
            if row not in PEERS:
                config.options_for(row)  # typed options: raises for a row that cannot run


def test_the_taesd_ab_times_both_vaes_on_one_model(tmp_path):
    """``python -m sdtrt.bench.vae_ab`` on the tiny model: TAESD's full architecture (random
    weights) against the model's VAE, each stage's median, the ratios those give."""
    from diffusers import AutoencoderTiny

    from sdtrt.bench.vae_ab import measure, random_taesd

    report = measure("tiny", None, size=64, repeats=1, device="cpu")
    assert set(report["median_ms"]) == {"model's VAE", "TAESD"}
    for stages in report["median_ms"].values():
        assert set(stages) == {"text_encoder", "vae_encoder", "denoise", "vae_decoder", "total"}
        assert all(ms > 0 for ms in stages.values())
    full, tiny = report["median_ms"]["model's VAE"], report["median_ms"]["TAESD"]
    assert report["speedup"]["end_to_end"] == full["total"] / tiny["total"]
    assert report["speedup"]["vae_decoder"] == full["vae_decoder"] / tiny["vae_decoder"]
    taesd = AutoencoderTiny.from_pretrained(random_taesd(tmp_path / "taesd"))
    assert report["vae_parameters"]["TAESD"] == sum(p.numel() for p in taesd.parameters())
    assert report["vae_parameters"]["TAESD"] > 2_000_000  # TAESD's own size (2.4 M)


def test_the_cutoff_ab_halves_the_unet_rows_after_the_cutoff():
    """``python -m sdtrt.bench.cutoff_ab`` on the tiny model: guided at every step against
    diffusers' SDCFGCutoffCallback, the rows each run's UNet took, the ratio of the medians,
    and how far apart the images are."""
    from sdtrt.bench.cutoff_ab import measure

    report = measure("tiny", size=64, steps=10, ratio=0.5, repeats=1, device="cpu")
    guided, cut = report["runs"]["guided"], report["runs"]["cutoff 0.5"]
    assert guided["unet_calls"] == cut["unet_calls"] == 8  # strength 0.8 of 10 steps
    # Guided: 8 calls of 2 rows; cut off after step int(0.5 * 8) = 4: 5 of 2 rows, 3 of 1.
    assert guided["unet_rows"] == 16 and cut["unet_rows"] == 13
    assert report["speedup"] == guided["median_ms"]["total"] / cut["median_ms"]["total"]
    assert 0 < report["mean_levels_apart"] < 40  # unguided steps: another image, near it


def test_the_protocol_ab_times_each_way_a_picture_crosses_the_wire():
    """``python -m sdtrt.bench.kserve_ab``: each protocol's read and answer timed, their
    ratios to the binary form's, the answers' sizes; every read gives the picture back."""
    from sdtrt.bench.kserve_ab import measure

    record = measure(size=32, repeats=1)
    assert set(record["read"]) == {"v2 binary", "v2 JSON", "v1 base64 PNG", "gRPC raw",
                                   "gRPC typed"}  # fmt: skip
    assert set(record["answer"]) == {"v2 binary", "v2 JSON", "v1 PNG", "gRPC raw"}
    for direction in ("read", "answer"):
        rows = record[direction]
        assert all(row["ms"] > 0 for row in rows.values())
        assert rows["v2 binary"]["vs binary"] == 1.0
        assert rows["v2 JSON"]["vs binary"] == rows["v2 JSON"]["ms"] / rows["v2 binary"]["ms"]
    assert record["answer"]["v2 binary"]["bytes"] > 32 * 32 * 3  # the pixels and a header


def test_the_priority_ab_runs_both_servers_on_the_same_arrivals():
    """``python -m sdtrt.bench.priority_ab``: a server with levels and one without, driven
    with the same requests (urgent ones sent priority 1 where levels exist); every request
    answered and counted in its class, per run; medians and ratios from the runs."""
    from sdtrt.bench.priority_ab import measure

    record = measure(rate=200.0, requests=8, urgent=0.5, max_rows=2, repeats=1, seed=1)
    for name in ("levels", "none"):
        (run,) = record["runs"][name]
        assert run["urgent"]["requests"] + run["rest"]["requests"] == 8
        assert run["urgent"]["requests"] >= 1 and run["rest"]["requests"] >= 1
        assert record["medians"][name] == run  # the median of one run is that run
        for row in run.values():
            assert row["p90_ms"] >= row["p50_ms"] > 0 and row["wait_ms"] >= 0
    levels, none = record["medians"]["levels"], record["medians"]["none"]
    ratio = record["ratios"]["urgent p50, levels/none"]
    assert ratio == levels["urgent"]["p50_ms"] / none["urgent"]["p50_ms"]


def test_the_preview_ab_times_each_decoder(monkeypatch, capsys):
    """``python -m sdtrt.bench.preview_ab`` (tiny-random: TAESD's architecture made for it):
    a row per run, each a time and its ratio to the run without previews."""
    import re
    import sys

    from sdtrt.bench import preview_ab

    argv = ["preview_ab", "--model", "tiny-random", "--size", "64", "--steps", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1"])
    preview_ab.main()
    rows = re.findall(r"^\| (.+?) \| (\d+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [name for name, _, _ in rows] == [
        "no previews", "model's VAE, every 5th step", "model's VAE, every step",
        "TAESD, every 5th step", "TAESD, every step",
    ]  # fmt: skip
    assert rows[0][2] == "1.00" and all(int(ms) > 0 for _, ms, _ in rows)
