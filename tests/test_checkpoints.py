"""Real checkpoints as users keep them: a diffusers folder, a folder of only the fp16 variant,
and a single file in the original Stable Diffusion layout. The same weights in any of the
three give the same image and the same fingerprint; what cannot be loaded says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import save_diffusers_folder, unet_variant
from ldm_layout import to_ldm_checkpoint
from safetensors.torch import save_file

from sdtrt.cli import main
from sdtrt.models import folder_variants, load_components, model_fingerprint
from sdtrt.source import ModelSource

RUN = ["--scheduler", "pndm", "--steps", "4", "--height", "32", "--width", "48", "--no-progress"]


def _variant_folder(tiny, path, variants):
    """A folder whose weights exist only as the named variants (tiny's fp32 values)."""
    for variant in variants:
        save_diffusers_folder(tiny, path, variant=variant)
    return path


@pytest.fixture(scope="module")
def shapes(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    folder = root / "folder"
    save_diffusers_folder(tiny, folder)
    for extra in ("safety_checker", "feature_extractor", "image_encoder"):  # repos carry these
        (folder / extra).mkdir()
        (folder / extra / "config.json").write_text("{}")
    single = root / "tiny.safetensors"
    save_file(to_ldm_checkpoint(tiny), str(single))
    sharded = shutil.copytree(folder, root / "sharded")  # as big models ship: NAME-0000K-of-N
    for name in ("text_encoder", "unet"):
        shutil.rmtree(sharded / name)
        tiny[name].save_pretrained(sharded / name, max_shard_size="200KB")
    assert len(list((sharded / "unet").glob("*-of-*.safetensors"))) > 1
    pickled = shutil.copytree(folder, root / "pickled")  # older repositories: .bin weights
    for name in ("unet", "vae"):
        shutil.rmtree(pickled / name)
        tiny[name].save_pretrained(pickled / name, safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    return {
        "folder": ModelSource(str(folder)),
        "sharded": ModelSource(str(sharded)),
        "pickled": ModelSource(str(pickled)),
        "fp16-variant": ModelSource(str(_variant_folder(tiny, root / "fp16", ["fp16"]))),
        "single-file": ModelSource(str(single), config=str(folder)),
    }


def _image(args, tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    assert main(["img2img", *args, "--out", str(out), *RUN]) == 0, capsys.readouterr().err
    with PIL.Image.open(out) as image:
        return np.asarray(image)


def _args(source):
    args = ["--model", source.model]
    return args + ["--config", source.config] * bool(source.config)


def test_every_shape_gives_the_same_image_and_fingerprint(shapes, tmp_path, capsys):
    reference = _image(["--model", "tiny"], tmp_path, capsys, "tiny")
    prints = set()
    for name, source in shapes.items():
        got = _image(_args(source), tmp_path, capsys, name)
        assert np.array_equal(got, reference), name
        prints.add(model_fingerprint(load_components(source)))
    assert len(prints) == 1  # the same weights, whatever shape they came in


def test_a_hub_id_in_the_hugging_face_cache_is_its_folder_there(
    shapes, empty_hugging_face_cache, tmp_path, capsys
):
    """A model diffusers (or `hf download`) already fetched is in the Hugging Face cache:
    its Hub id names it, offline, as in diffusers. The cache's layout: files in
    snapshots/REVISION are links to blobs, refs/main names the revision."""
    import hashlib
    import os

    repo = empty_hugging_face_cache / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / "0123abcd"
    for file in Path(shapes["folder"].model).rglob("*"):
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(shapes["folder"].model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    try:
        assert ModelSource("someone/tiny-sd").model == str(snapshot)
        reference = _image(["--model", shapes["folder"].model], tmp_path, capsys, "folder")
        got = _image(["--model", "someone/tiny-sd"], tmp_path, capsys, "hub")
        assert np.array_equal(got, reference)
    finally:
        shutil.rmtree(repo)  # the session's cache stays empty for the other tests
    assert ModelSource("someone/tiny-sd").model == "someone/tiny-sd"  # gone: as given


def test_bin_weights_load_without_a_logged_error(tiny, shapes, tmp_path):
    """diffusers, asked for safetensors first, logs "An error occurred while trying to fetch"
    before it reads a folder's .bin weights; sdtrt asks for what the folder holds: .bin
    default weights, or a .bin variant beside safetensors default weights."""
    import logging

    mixed = shutil.copytree(shapes["folder"].model, tmp_path / "mixed")
    for name in ("unet", "vae"):
        tiny[name].save_pretrained(mixed / name, safe_serialization=False, variant="fp16")
    tiny["text_encoder"].save_pretrained(mixed / "text_encoder", variant="fp16")
    assert (mixed / "unet" / "diffusion_pytorch_model.fp16.bin").is_file()

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # its own handler; it does not propagate
    diffusers_logger.addHandler(handler)
    try:
        load_components(shapes["pickled"])
        load_components(ModelSource(str(mixed), variant="fp16"))
    finally:
        diffusers_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_variant_folders(tiny, shapes, tmp_path, capsys):
    fp16 = shapes["fp16-variant"].model
    assert folder_variants(__import__("pathlib").Path(fp16))["unet"] == {"fp16"}
    code = main(["img2img", "--model", fp16, "--variant", "ema", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "no 'ema' weights in text_encoder, unet, vae" in err
    assert "variants there: fp16" in err
    several = _variant_folder(tiny, tmp_path / "several", ["ema", "bf16"])
    code = main(["img2img", "--model", str(several), "--out", str(tmp_path / "y.png")])
    err = capsys.readouterr().err
    assert code == 2 and "several variants (bf16, ema): name one with --variant" in err
    assert main(["img2img", "--model", str(several), "--variant", "ema",
                 "--out", str(tmp_path / "z.png"), *RUN]) == 0  # fmt: skip


def test_single_file_refusals(shapes, tmp_path, capsys):
    single = shapes["single-file"].model
    cases = [
        (["--model", single], "pass --config with a diffusers folder"),
        (["--model", single, "--config", str(tmp_path / "nope")], "does not exist"),
    ]
    ckpt = tmp_path / "tiny.ckpt"
    shutil.copy(single, ckpt)
    cases.append((["--model", str(ckpt), "--config", shapes["folder"].model], "is a pickle"))
    import torch

    other = tmp_path / "other.safetensors"  # a safetensors file, but not of a model
    save_file({"a": torch.zeros(2)}, str(other))
    cases.append(
        (["--model", str(other), "--config", shapes["folder"].model], "Weights for this component")
    )
    no_tokenizer = shutil.copytree(shapes["folder"].model, tmp_path / "no-tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    cases.append(
        (
            ["--model", single, "--config", str(no_tokenizer)],
            "not a complete diffusers folder for --config: missing tokenizer",
        )
    )
    for args, message in cases:
        code = main(["img2img", *args, "--out", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, args
    assert not (tmp_path / "o.png").exists()


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: shutil.rmtree(f / "unet"), "missing unet/config.json"),
        (lambda f: (f / "text_encoder" / "config.json").unlink(), "missing text_encoder/config"),
        (
            lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()],
            "missing tokenizer/tokenizer.json (or vocab.json and merges.txt)",
        ),
        (
            lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="Foo"),
            "names the scheduler class 'Foo', which diffusers",
        ),
        (
            lambda f: (f / "scheduler" / "scheduler_config.json").write_text("{not json"),
            "scheduler_config.json is not a readable JSON config",
        ),
        (
            lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
            "could not load text_encoder/ of the diffusers folder",
        ),
        (
            lambda f: (f / "model_index.json").write_text('{"_class_name": "StableDiff'),
            "model_index.json is not a readable JSON object",
        ),
        (lambda f: (f / "model_index.json").write_text("[]"), "is not a readable JSON object"),
    ],
    ids=[
        "no-unet",
        "no-text-config",
        "no-tokenizer",
        "unknown-scheduler",
        "bad-json",
        "cut",
        "cut-index",
        "index-a-list",
    ],
)
def test_a_broken_folder_is_named_without_a_traceback(shapes, tmp_path, capsys, damage, named):
    broken = shutil.copytree(shapes["folder"].model, tmp_path / "broken")
    damage(broken)
    code = main(["img2img", "--model", str(broken), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err


def test_single_file_exports_and_checks(shapes, tmp_path, capsys):
    """export and check take a single file too; the manifest remembers its config, so
    check finds the PyTorch reference again."""
    out = tmp_path / "onnx"
    source = shapes["single-file"]
    args = ["export", *_args(source), "--precision", "fp32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "sdtrt.json").read_text())
    assert manifest["source"]["config"] == source.config
    assert manifest["source"]["fingerprint"] == model_fingerprint(load_components(source))
    code = main(["check", "--model", str(out)])
    assert code == 0, capsys.readouterr().out


# UNets of other Stable Diffusion pipelines at tiny sizes: their config changes, and what
# the refusal says they take.
OTHER_KINDS = {
    "inpainting": ({"in_channels": 9}, "9 input channels where the VAE's latents have 4"),
    "sdxl": (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,
            "cross_attention_dim": 64,
        },
        "text states 64 wide, the text encoder gives 32; its UNet takes added conditions",
    ),
    "lcm": ({"time_cond_proj_dim": 16}, "a guidance-scale embedding (an LCM-distilled UNet)"),
    "upscaler": ({"in_channels": 7, "num_class_embeds": 1000}, "class labels"),
}


def test_the_unet_config_check_passes_sd_and_names_what_others_take(tiny):
    from sdtrt.errors import UnsupportedModelError
    from sdtrt.export.networks import check_unet_config

    config = dict(tiny["unet"].config)
    check_unet_config(config, 4, 32, "tiny")  # every key a diffusers UNet config has
    check_unet_config({**config, "cross_attention_dim": [32, 32]}, 4, 32, "per-block widths")
    for changes, named in OTHER_KINDS.values():
        with pytest.raises(UnsupportedModelError, match="is not a model sdtrt runs") as info:
            check_unet_config({**config, **changes}, 4, 32, "x")
        assert named in str(info.value)


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_other_kinds_of_folder_are_refused_before_any_weights_load(
    tiny, tmp_path, capsys, monkeypatch, kind
):
    changes, named = OTHER_KINDS[kind]
    save_diffusers_folder(unet_variant(tiny, **changes), tmp_path / kind)
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    out = tmp_path / "o.png"
    code = main(["img2img", "--model", str(tmp_path / kind), "--out", str(out), *RUN])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{tmp_path / kind} (StableDiffusionImg2ImgPipeline) is not a model sdtrt runs" in err
    assert named in err
    assert not out.exists()


def test_an_inpainting_checkpoint_file_is_refused(tiny, tmp_path, capsys):
    changes, named = OTHER_KINDS["inpainting"]
    inpainting = unet_variant(tiny, **changes)
    save_diffusers_folder(inpainting, tmp_path / "config")
    single = tmp_path / "inpainting.safetensors"
    save_file(to_ldm_checkpoint(inpainting), str(single))
    args = ["--model", str(single), "--config", str(tmp_path / "config")]
    assert main(["export", *args, "--out", str(tmp_path / "onnx"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inpainting.safetensors (with the config" in err and named in err
    assert not (tmp_path / "onnx").exists()


def test_clip_skip_is_checked_and_keys_what_is_exported(tiny, tmp_path, capsys):
    """--clip-skip N on any command: an integer >= 0 (0: every layer), fewer than the text
    encoder's layers, said before any work; the cut text encoder is another fingerprint,
    so the cache never serves one export for the other."""
    from sdtrt.errors import InvalidInputError

    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(InvalidInputError, match="clip skip must be an integer >= 0"):
            ModelSource("tiny", clip_skip=bad)
    assert "clip skip 2" in ModelSource("tiny", clip_skip=2).describe()
    whole = model_fingerprint(tiny)
    assert model_fingerprint(load_components(ModelSource("tiny", clip_skip=0))) == whole
    cut = load_components(ModelSource("tiny", clip_skip=1))
    assert cut["text_encoder"].config.num_hidden_layers == 4 and model_fingerprint(cut) != whole
    assert tiny["text_encoder"].config.num_hidden_layers == 5  # a fresh load was cut, not this
    out = tmp_path / "out.png"
    for command in (["img2img", *RUN, "--out", str(out)], ["export", "--out", str(tmp_path / "e")]):
        assert main([*command, "--clip-skip", "5"]) == 2
        assert "clip skip 5 leaves no layer of the text encoder's 5: give 1 to 4" in (
            capsys.readouterr().err
        )
    assert list(tmp_path.iterdir()) == []
