"""ONNX export, the ONNX Runtime backend and `sdtrt check`, on the tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import fake_network_export
from onnx import numpy_helper

from sdtrt.bench.check import compare_networks
from sdtrt.cli import main
from sdtrt.errors import GraphIntegrityError, InvalidInputError
from sdtrt.export import cache as cache_module
from sdtrt.export.exporter import graph_plan
from sdtrt.export.folder import sha256_file
from sdtrt.export.networks import NETWORK_NAMES
from sdtrt.options import CacheOptions, OrtOptions
from sdtrt.runtime.pipeline import Img2ImgPipeline


def test_networks_match_torch_fp32(exported, tiny):
    results = compare_networks(exported, tiny, "fp32")
    assert {r.network for r in results} == set(NETWORK_NAMES)
    # Batch 1 and 3, two image sizes of different aspect (32x48 and 64x32 px).
    assert {r.shape for r in results if r.network == "vae_encoder"} == {"1x3x32x48", "3x3x64x32"}
    assert {r.shape for r in results if r.network == "unet"} == {"2x4x4x6", "6x4x8x4"}
    worst = max(r.rel_l2 for r in results)
    assert worst <= 1e-5, [(r.network, r.shape, r.rel_l2) for r in results]
    assert min(r.cosine for r in results) > 0.999999


@pytest.mark.parametrize("scheduler", ["lms", "euler_a"])
def test_img2img_on_onnxruntime_equals_torch(exported, tiny, images, scheduler):
    graph = Img2ImgPipeline.from_pretrained(
        exported.root, backend="onnxruntime", scheduler=scheduler, show_progress=False
    )
    reference = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    run = dict(strength=0.7, num_inference_steps=10, output_type="np")
    got = graph(["a dancer", "a cat"], images, generator=torch.Generator().manual_seed(3), **run)
    want = reference(
        ["a dancer", "a cat"], images, generator=torch.Generator().manual_seed(3), **run
    )
    levels = np.abs(np.round(got.images * 255) - np.round(want.images * 255)).max()
    assert got.images.shape == (2, 32, 48, 3)
    assert levels <= 1
    assert got.unet_calls == want.unet_calls == 7


def test_sessions_do_not_spin_by_default(exported):
    """ONNX Runtime's worker threads would busy-wait after each run, holding the cores the
    PyTorch work between runs needs (bench/README.md): off unless asked for."""
    spin = "session.intra_op.allow_spinning"
    for options, want in ((OrtOptions(device="cpu"), "0"), (OrtOptions(spinning=True), "1")):
        pipe = Img2ImgPipeline.from_pretrained(exported.root, options, show_progress=False)
        sessions = pipe.backend.sessions.values()
        assert [s.get_session_options().get_session_config_entry(spin) for s in sessions] == [
            want
        ] * 4


def test_an_opset_the_exporter_cannot_reach_is_refused(tiny, tmp_path):
    """`--opset 99` (or 28, whose Attention has no adapter from 22): torch's converter
    warned, left the graph at opset 18 with newer operators, and the checker's
    ValidationError came out as a traceback. A typed error saying what to do instead."""
    from sdtrt.export.networks import ModelDims, networks_for
    from sdtrt.export.onnx_export import export_network

    network = networks_for(ModelDims.from_components(tiny))["text_encoder"]
    path = tmp_path / "model.onnx"
    with pytest.raises(InvalidInputError, match="text_encoder at opset 99: .* at opset 18"):
        export_network(network, tiny["text_encoder"], path, precision="fp32", opset=99)
    assert list(tmp_path.iterdir()) == []


def test_a_guidance_cutoff_runs_on_onnxruntime_as_on_torch(exported, tiny, images):
    """diffusers' SDCFGCutoffCallback on the graphs: the UNet graph takes the image's row
    alone after the cutoff (its batch axis is dynamic); the torch backend's image within a
    level."""
    from diffusers.callbacks import SDCFGCutoffCallback

    graph = Img2ImgPipeline.from_pretrained(exported.root, show_progress=False)
    rows: list[int] = []
    unet = graph.backend.unet
    graph.backend.unet = lambda x, t, texts: rows.append(len(x)) or unet(x, t, texts)
    reference = Img2ImgPipeline.from_components(tiny, show_progress=False)
    run = dict(strength=0.7, num_inference_steps=10, output_type="np")
    run["callback_on_step_end"] = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    got = graph("a dog", images[0], generator=torch.Generator().manual_seed(3), **run)
    want = reference("a dog", images[0], generator=torch.Generator().manual_seed(3), **run)
    levels = np.abs(np.round(got.images * 255) - np.round(want.images * 255)).max()
    assert got.images.shape == (1, 32, 48, 3) and levels <= 1
    assert rows == [2] * 4 + [1] * 3  # the callback ends step 3 (int(0.5 * 7)) unguided


def test_latents_as_the_image_run_on_onnxruntime_as_on_torch(exported, tiny, images):
    """Latents given as the image skip the encoder graph on ONNX Runtime too: the torch
    backend's image within a level; a size the graphs' size rule refuses is refused."""
    from sdtrt.errors import InvalidInputError

    graph = Img2ImgPipeline.from_pretrained(exported.root, show_progress=False)
    reference = Img2ImgPipeline.from_components(tiny, show_progress=False)
    latents = reference(["a dancer", "a cat"], images, strength=1.0, num_inference_steps=4,
                        output_type="latent").images  # fmt: skip
    run = dict(strength=0.6, num_inference_steps=10, output_type="np")
    got = graph(["a dog", "a cat"], latents, generator=torch.Generator().manual_seed(3), **run)
    want = reference(["a dog", "a cat"], latents, generator=torch.Generator().manual_seed(3), **run)
    levels = np.abs(np.round(got.images * 255) - np.round(want.images * 255)).max()
    assert got.images.shape == (2, 32, 48, 3) and levels <= 1
    assert "vae_encoder" not in got.timings_ms
    with pytest.raises(InvalidInputError, match="height 8 is not a multiple of 16 px"):
        graph("a dog", latents[:, :, :1], **run)


def test_prompt_embeddings_run_on_an_export_as_their_prompts(exported, images):
    """An export knows its text encoder's output shape from its manifest: embeddings of
    that shape run on ONNX Runtime as the prompts they encode; others are refused."""
    from sdtrt.errors import InvalidInputError
    from sdtrt.runtime.steps import token_ids

    graph = Img2ImgPipeline.from_pretrained(exported.root, show_progress=False)
    assert graph.text_shape == (77, exported.dims.text_hidden_size)
    embeds = graph.backend.encode_text(token_ids(graph.tokenizer, ["a dancer"]))
    run = dict(strength=0.7, num_inference_steps=6, output_type="np")
    by_text = graph("a dancer", images[0], generator=torch.Generator().manual_seed(3), **run)
    by_embeds = graph(image=images[0], prompt_embeds=embeds,
                      generator=torch.Generator().manual_seed(3), **run)  # fmt: skip
    np.testing.assert_array_equal(by_embeds.images, by_text.images)
    with pytest.raises(InvalidInputError, match="expected \\[prompts, 77, "):
        graph(image=images[0], prompt_embeds=embeds[:, :, :-1], **run)


def test_manifest(exported, tiny):
    from sdtrt.models import model_fingerprint

    m = exported.manifest
    assert m["source"] == {
        "model": "tiny",
        "variant": None,
        "config": None,
        "allow_pickle": False,
        "vae": None,
        "loras": [],
        "embeddings": [],
        "clip_skip": None,
        "fingerprint": model_fingerprint(tiny),
    }
    assert m["opset"] == 20 and m["size_multiple"] == 16 and m["vae_scale_factor"] == 8
    assert m["scaling_factor"] == pytest.approx(tiny["vae"].config.scaling_factor)
    assert "16 px" in m["size_rule"]
    assert set(m["versions"]) == {"torch", "diffusers", "transformers", "onnx"}
    for network in NETWORK_NAMES:
        file = m["precisions"]["fp32"][network]["file"]
        assert file == f"{network}/model.onnx"
        assert m["graphs"][file]["sha256"]["model.onnx"] == sha256_file(exported.root / file)
    assert m["networks"]["unet"]["inputs"]["sample"] == [["2B", 1], 4, ["h", 2], ["w", 2]]
    # The graphs carry the contract's names and dtypes.
    unet = onnx.load(str(exported.root / "unet/model.onnx"), load_external_data=False)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in unet.graph.input
    }
    assert dims == {
        "sample": ["2B", 4, "h", "w"],
        "timestep": ["2B"],  # one per row (format 2): the server batches rows at any step
        "encoder_hidden_states": ["2B", 77, 32],
    }
    io = m["graphs"]["unet/model.onnx"]["io"]
    assert io["inputs"]["timestep"] == {"dtype": "float32", "shape": ["2B"]}
    assert io["outputs"] == {"out_sample": {"dtype": "float32", "shape": ["2B", 4, "h", "w"]}}
    for folder in ("tokenizer", "scheduler", "text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (exported.root / folder).is_dir()


def test_fp16_graphs(exported_fp16, tiny, caplog):
    root = exported_fp16.root
    for network in NETWORK_NAMES:
        path = root / f"{network}/model_fp16.onnx"
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
        big = [w for w in weights if w.size > 16 and w.dtype.kind == "f"]
        assert big and all(w.dtype == np.float16 for w in big), network
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        if network == "unet":  # fractional timesteps stay fp32
            assert types["timestep"] == onnx.TensorProto.FLOAT
            assert types["sample"] == onnx.TensorProto.FLOAT16
    results = compare_networks(exported_fp16, tiny, "fp16")
    assert max(r.rel_l2 for r in results) <= 5e-3
    caplog.clear()
    pipe = Img2ImgPipeline.from_pretrained(root, OrtOptions(precision="fp16"), show_progress=False)
    out = pipe("a", np.zeros((32, 32, 3), np.float32), num_inference_steps=3, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    # On the CPU provider fp16 is slower than fp32 (1.6x per UNet call, measured): said once.
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "fp16 graphs on ONNX Runtime's CPU provider run slower than fp32 (most of its CPU "
        "kernels are fp32's): use them to check fp16 numbers, fp32 for speed"
    ]


@pytest.mark.parametrize("batch, height, width", [(1, 512, 512), (3, 256, 768)])
def test_output_shape_from_input_shapes(batch, height, width):
    """What the ONNX Runtime CUDA binding allocates: each output's shape from its inputs'."""
    from sdtrt.export.networks import ModelDims, networks_for

    sd = ModelDims(text_hidden_size=768, latent_channels=4, vae_scale_factor=8, unet_factor=8)
    for network in networks_for(sd).values():
        shapes = network.shapes(batch, height, width)
        (output,) = network.outputs
        got = network.output_shape({name: shapes[name] for name in network.inputs})
        assert got == shapes[output], network.name
    expected = {
        "text_encoder": (batch, 77, 768),
        "unet": (2 * batch, 4, height // 8, width // 8),
        "vae_encoder": (batch, 8, height // 8, width // 8),
        "vae_decoder": (batch, 3, height, width),
    }
    assert {n: net.shapes(batch, height, width)[next(iter(net.outputs))]
            for n, net in networks_for(sd).items()} == expected  # fmt: skip


def test_vae_precision_plan_points_at_fp32_graphs():
    plan = graph_plan(NETWORK_NAMES, ("fp32", "fp16"), "fp32")
    assert plan["fp16"]["unet"] == {"file": "unet/model_fp16.onnx", "precision": "fp16"}
    assert plan["fp16"]["vae_decoder"] == {"file": "vae_decoder/model.onnx", "precision": "fp32"}
    assert plan["fp32"]["vae_encoder"]["file"] == "vae_encoder/model.onnx"


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDTRT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_module.cache_root() == tmp_path / "home" / ".cache" / "sdtrt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # as HF and torch read it
    assert cache_module.cache_root() == tmp_path / "xdg" / "sdtrt"
    monkeypatch.setenv("SDTRT_CACHE", "~/sd")
    assert cache_module.cache_root() == tmp_path / "home" / "sd"
    assert cache_module.cache_root(tmp_path / "given") == tmp_path / "given"


def test_cache_is_reused(exported, tiny, onnx_cache, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of reusing the cache")

    monkeypatch.setattr("sdtrt.export.exporter.export_model", no_export)
    cache = CacheOptions(cache_dir=str(onnx_cache))
    again = cache_module.exported_for(tiny, precision="fp32", cache=cache)
    assert again.root == exported.root
    pipe = Img2ImgPipeline.from_components(tiny, "onnxruntime", cache=cache, show_progress=False)
    assert pipe.backend.name == "onnxruntime"


def test_a_reference_is_held_to_the_model_the_folder_records(exported):
    """`sdtrt check --reference` on an sdtrt export (which records its model): another
    model ran every network and "failed" by a mile (rel L2 1-12), saying nothing about
    the export. Now refused naming both; the recorded model itself is taken."""
    with pytest.raises(InvalidInputError, match="the reference tiny-random is not the model"):
        exported.source_components("tiny-random")
    components = exported.source_components("tiny")
    assert set(components) >= {"text_encoder", "unet", "vae", "tokenizer", "scheduler"}


def test_size_the_graphs_cannot_take_is_refused(exported, images):
    pipe = Img2ImgPipeline.from_pretrained(exported.root, show_progress=False)
    with pytest.raises(InvalidInputError, match="nearest valid sizes are 32 and 48"):
        pipe("a", images[0], height=40, width=48, num_inference_steps=2)


def _copy(exported, tmp_path):
    return shutil.copytree(exported.root, tmp_path / "copy")


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def _truncate(root):
    path = root / "unet/model.onnx"
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt(root):
    path = root / "vae_decoder/model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_version(root):
    manifest = json.loads((root / "sdtrt.json").read_text())
    manifest["format_version"] = 99
    (root / "sdtrt.json").write_text(json.dumps(manifest))


def _other_model(root):
    manifest = json.loads((root / "sdtrt.json").read_text())
    manifest["source"]["fingerprint"] = "0" * 64
    (root / "sdtrt.json").write_text(json.dumps(manifest))


def _no_manifest_no_index(root):
    # Without sdtrt.json alone it is still the Hugging Face layout, adopted as optimum's are.
    (root / "sdtrt.json").unlink()
    (root / "model_index.json").unlink()


def _no_dims(root):
    manifest = json.loads((root / "sdtrt.json").read_text())
    del manifest["dims"]["latent_channels"]
    (root / "sdtrt.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: shutil.rmtree(root / "vae_encoder"), "graph file"),
        (lambda root: (root / "sdtrt.json").write_text("{cut"), "sdtrt.json is not valid JSON"),
        (lambda root: (root / "sdtrt.json").write_text("[]"), "sdtrt.json is not a JSON object"),
        (_no_dims, "sdtrt.json is damaged: dims missing or malformed"),
        (lambda root: shutil.rmtree(root / "tokenizer"), "is missing its tokenizer/ files"),
        (
            lambda root: (root / "scheduler" / "scheduler_config.json").unlink(),
            "is missing scheduler/scheduler_config.json",
        ),
        (_truncate, "does not match its manifest"),
        (_corrupt, "does not match its manifest"),
        (_no_manifest_no_index, "neither an sdtrt.json manifest"),
        (_other_version, "export the model again"),
        (_other_model, "exported from another model"),
    ],
    ids=[
        "missing-network",
        "manifest-not-json",
        "manifest-not-object",
        "manifest-without-dims",
        "no-tokenizer",
        "no-scheduler-config",
        "truncated",
        "corrupt",
        "no-manifest",
        "version",
        "other-model",
    ],
)
def test_bad_folders_exit_2(exported, tmp_path, capsys, damage, message):
    root = _copy(exported, tmp_path)
    damage(root)
    for command in (
        ["check", "--model", str(root)],
        [
            "img2img",
            "--model",
            str(root),
            "--backend",
            "onnxruntime",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            str(tmp_path / "o.png"),
        ],
    ):
        if command[0] == "img2img" and damage is _other_model:
            continue  # img2img does not need the source model
        code, captured = _cli(command, capsys)
        assert code == 2, command
        assert message in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "o.png").exists()
    if damage is _other_model:  # the bench compares with the source model too
        bench = ["bench", "--model", str(root), "--backends", "torch", "--steps", "2",
                 "--height", "32", "--width", "32", "--warmup", "0", "--repeats", "1"]  # fmt: skip
        code, captured = _cli(bench, capsys)
        assert code == 2 and message in captured.err


def test_missing_folder_exits_2(tmp_path, capsys):
    code, captured = _cli(["check", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "unknown model" in captured.err


def test_check_passes_and_writes_json(exported, tmp_path, capsys):
    code, captured = _cli(
        ["check", "--model", str(exported.root), "--json", str(tmp_path / "r.json")], capsys
    )
    assert code == 0, captured.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["image"]["max_levels"] <= 1
    assert len(report["networks"]) == 8
    assert "| unet |" in captured.out
    # The latents after each of the int(8 x 0.75) = 6 steps, fp32 graphs against torch.
    assert len(report["steps"]) == 6 and max(report["steps"]) <= 1e-4
    assert "latents after each of the 6 steps, rel L2 against torch: " in captured.out


def test_check_fails_on_perturbed_weights(exported, tmp_path, capsys):
    root = _copy(exported, tmp_path)
    path = root / "unet/model.onnx"
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest).copy()
    weights += np.float32(0.05) * np.random.default_rng(0).standard_normal(weights.shape).astype(
        np.float32
    )
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    onnx.save(model, str(path))
    # Keep the manifest consistent so the check, not the integrity test, catches it.
    manifest = json.loads((root / "sdtrt.json").read_text())
    manifest["graphs"]["unet/model.onnx"]["sha256"]["model.onnx"] = sha256_file(path)
    (root / "sdtrt.json").write_text(json.dumps(manifest))
    code, captured = _cli(
        ["check", "--model", str(root), "--json", str(tmp_path / "r.json")], capsys
    )
    assert code == 1
    assert "FAILED" in captured.out
    drift = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert drift[0] > 1e-3  # the perturbed UNet shows from the first step


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp8"], "precision must list fp32 and/or fp16"),
        (["--opset", "17"], "opset must be >= 18"),
    ],
)
def test_export_refuses_bad_options_before_any_work(tmp_path, capsys, extra, message):
    code, captured = _cli(
        ["export", "--model", "tiny", "--out", str(tmp_path / "x"), *extra], capsys
    )
    assert code == 2 and message in captured.err
    assert not (tmp_path / "x").exists()


def test_the_unet_graph_takes_a_timestep_per_row(exported):
    """Rows at different steps in one call (what the server batches) give what separate
    calls give, up to batched kernels' rounding."""
    from sdtrt.engine.ort_backend import OrtBackend

    backend = OrtBackend(exported)
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(4, 4, 2, 4, generator=generator)
    hidden = torch.randn(4, 77, 32, generator=generator)
    both = backend.unet(sample, torch.tensor([901.0, 901.0, 401.5, 401.5]), hidden)
    first = backend.unet(sample[:2], torch.tensor(901.0), hidden[:2])
    second = backend.unet(sample[2:], torch.tensor([401.5]), hidden[2:])
    assert both.shape == (4, 4, 2, 4)
    assert float((both - torch.cat([first, second])).abs().max()) <= 1e-5
    assert float((first - second).abs().max()) > 1e-3  # the timestep did matter
    with pytest.raises(InvalidInputError, match="3 timesteps for 4 UNet rows"):
        backend.unet(sample, torch.tensor([1.0, 2.0, 3.0]), hidden)


def test_the_graphs_take_more_rows_than_the_tracing_bound(exported, tiny):
    """The batch axes are bounded while tracing (BATCH_DIM_MAX, below diffusers' Upsample2D
    branch at 64) but the graphs carry no bound: a UNet call of 66 rows and a decode of 66
    latents run and equal PyTorch's."""
    from sdtrt.engine.ort_backend import OrtBackend
    from sdtrt.export.onnx_export import BATCH_DIM_MAX

    rows = 66
    assert rows > BATCH_DIM_MAX
    backend = OrtBackend(exported)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(rows, 4, 2, 4, generator=generator)
    hidden = torch.randn(rows, 77, 32, generator=generator)
    timesteps = torch.linspace(1.0, 901.0, rows)
    got = backend.unet(sample, timesteps, hidden)
    decoded = backend.decode_latents(sample)
    with torch.no_grad():
        want = tiny["unet"](sample, timesteps, encoder_hidden_states=hidden).sample
        want_decoded = tiny["vae"].decode(sample).sample
    assert got.shape == want.shape == (rows, 4, 2, 4)
    assert float((got - want).abs().max()) <= 1e-4
    assert decoded.shape == want_decoded.shape == (rows, 3, 16, 32)
    assert float((decoded - want_decoded).abs().max()) <= 1e-4


def test_an_export_of_format_1_is_refused_with_the_command_that_redoes_it(exported, tmp_path):
    from sdtrt.export.folder import MANIFEST, ExportedModel

    old = tmp_path / "old"
    shutil.copytree(exported.root, old)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(GraphIntegrityError, match=f"sdtrt export --model tiny --out {old}"):
        ExportedModel.open(old)


def test_exporting_an_export_names_the_model_it_came_from(exported, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["export", "--model", str(exported.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{exported.root} is an ONNX export, not PyTorch weights" in err
    assert "name the model it came from (tiny, as its sdtrt.json says)" in err
    assert not out.exists()


def test_sd2_options_export_and_pass_the_check(tmp_path, monkeypatch, capsys):
    """SD 2.x's options at tiny sizes (the UNet's linear projections, upcast attention and
    per-block head counts, the text encoder's GELU, v-prediction): a folder of them exports
    and its ONNX Runtime networks and image pass `sdtrt check` against PyTorch."""
    from conftest import save_diffusers_folder, unet_variant
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel

    from sdtrt.models import SD21_SCHEDULER_CONFIG, build_tiny, load_components

    components = unet_variant(
        build_tiny(), use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4)
    )
    text = components["text_encoder"].config
    text.hidden_act = "gelu"
    components["text_encoder"] = CLIPTextModel(text).eval()
    components["scheduler"] = PNDMScheduler.from_config(SD21_SCHEDULER_CONFIG)
    save_diffusers_folder(components, tmp_path / "sd2-tiny")
    monkeypatch.setenv("SDTRT_CACHE", str(tmp_path / "cache"))
    args = ["check", "--model", str(tmp_path / "sd2-tiny"), "--backend", "onnxruntime"]
    code, captured = _cli([*args, "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, captured.out + captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["networks"]) == 8 and report["image"]["max_levels"] <= 1
    loaded = load_components(str(tmp_path / "sd2-tiny"))
    assert loaded["unet"].config.use_linear_projection and loaded["unet"].config.upcast_attention
    assert loaded["scheduler"].config.prediction_type == "v_prediction"


def test_a_clip_skip_graph_is_the_definition_without_the_skipped_layers(tiny, tmp_path):
    """A text encoder cut for clip skip 2 exports as a graph of its kept layers only, and
    ONNX Runtime gives diffusers' clip_skip output of the whole encoder (the hidden state
    two layers from the end, through the final layer norm)."""
    import copy

    import onnxruntime as ort

    from sdtrt.export.networks import ModelDims, networks_for
    from sdtrt.export.onnx_export import export_network
    from sdtrt.models import skip_clip_layers

    network = networks_for(ModelDims.from_components(tiny))["text_encoder"]
    whole, cut = tiny["text_encoder"], copy.deepcopy(tiny["text_encoder"])
    skip_clip_layers(cut, 2)
    for name, module in (("whole", whole), ("cut", cut)):
        export_network(network, module, tmp_path / f"{name}.onnx", precision="fp32", opset=20)
    matmuls = {
        name: sum(n.op_type == "MatMul" for n in onnx.load(tmp_path / f"{name}.onnx").graph.node)
        for name in ("whole", "cut")
    }
    layers = whole.config.num_hidden_layers
    assert matmuls["cut"] < matmuls["whole"] and cut.config.num_hidden_layers == layers - 2
    draw = torch.Generator().manual_seed(0)
    ids = torch.randint(0, whole.config.vocab_size, (2, 77), generator=draw)
    session = ort.InferenceSession(str(tmp_path / "cut.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.int().numpy()})
    with torch.no_grad():
        hidden = whole(ids, output_hidden_states=True).hidden_states[-3]
        want = whole.final_layer_norm(hidden).numpy()
    assert got.shape == want.shape == (2, 77, whole.config.hidden_size)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_an_export_runs_with_its_own_clip_skip_and_refuses_weight_options(
    exported, tmp_path, monkeypatch
):
    """``sdtrt export --clip-skip 2`` exports the cut text encoder and records it; running
    the folder keeps it, asking for another is refused (layers cannot be skipped in a
    graph at run time), and options that choose PyTorch weights are refused, not ignored."""
    from sdtrt import api
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import ExportOptions
    from sdtrt.source import ModelSource

    exported_layers = {}

    def fake_export(network, module, path, **kwargs):
        if network.name == "text_encoder":
            exported_layers[kwargs["precision"]] = module.config.num_hidden_layers
        fake_network_export(network, module, path, **kwargs)

    monkeypatch.setattr("sdtrt.export.exporter.export_network", fake_export)
    folder = tmp_path / "skip2"
    options = ExportOptions(precisions=("fp32",))
    api.export(ModelSource("tiny", clip_skip=2), folder, options, show_progress=False)
    assert exported_layers == {"fp32": 3}  # tiny's 5 layers, less 2
    assert json.loads((folder / "sdtrt.json").read_text())["source"]["clip_skip"] == 2
    for asked in (None, 2):
        assert ExportedModel.open_as(ModelSource(str(folder), clip_skip=asked)).clip_skip == 2
    for asked in (0, 1):
        with pytest.raises(InvalidInputError, match=f"with clip skip 2.*--clip-skip {asked}`"):
            ExportedModel.open_as(ModelSource(str(folder), clip_skip=asked))
    assert ExportedModel.open_as(ModelSource(str(exported.root), clip_skip=0)).clip_skip is None
    with pytest.raises(InvalidInputError, match="exported without clip skip.*--clip-skip 1`"):
        ExportedModel.open_as(ModelSource(str(exported.root), clip_skip=1))
    with pytest.raises(InvalidInputError, match="--variant and --allow-pickle: for the PyTorch"):
        ExportedModel.open_as(ModelSource(str(folder), variant="fp16", allow_pickle=True))
    with pytest.raises(InvalidInputError, match="--config: for the PyTorch weights"):
        Img2ImgPipeline.from_pretrained(ModelSource(str(folder), config=str(folder)))
