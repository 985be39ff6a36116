"""Another VAE, LoRA weights fused and textual inversion embeddings added as the model loads
(`--vae`, `--lora FILE[:SCALE]`, `--embedding FILE[:TOKEN]`): the image diffusers gives
with that VAE, the same LoRA unfused at that scale, or the same embedding loaded; what is
left is a plain model (other weights, a longer vocabulary: another fingerprint), which
exports as any model does; the files that cannot apply are refused, saying why."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import diffusers_img2img

from sdtrt.cli import main
from sdtrt.errors import BackendUnavailableError, InvalidInputError, ModelNotFoundError
from sdtrt.models import load_components, model_fingerprint
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.source import ModelSource, parse_embedding, parse_lora

CALL = dict(strength=0.8, num_inference_steps=6, guidance_scale=7.0, output_type="np")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A rank-4 LoRA on the tiny UNet's attention and the text encoder's projections, in
    diffusers' layout (random up-projections: PEFT starts them at zero, which changes
    nothing)."""
    pytest.importorskip("peft", reason="peft (sdtrt[lora]) is not installed")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    fresh = load_components("tiny")
    layers = {}
    for part, targets in (
        ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
        ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ):
        module = fresh[part]
        # peft's own call: transformers' add_adapter asks for a newer peft than exists.
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), module)
        torch.manual_seed(len(part))
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.3)
        layers[part] = get_peft_model_state_dict(module)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"]
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_a_fused_lora_gives_diffusers_image_of_it_unfused(tiny, images, lora_file):
    ours = Img2ImgPipeline.from_pretrained(
        ModelSource("tiny", loras=((str(lora_file), 0.7),)), scheduler="euler", show_progress=False
    )
    reference = diffusers_img2img(load_components("tiny"), "euler")
    reference.load_lora_weights(str(lora_file), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    prompts = ["A colorful dancer, nat geo photo", "a cat"]
    got = ours(prompts, images, generator=torch.Generator().manual_seed(5), **CALL).images
    want = reference(prompts, images, generator=torch.Generator().manual_seed(5), **CALL).images
    assert got.shape == want.shape == (2, 32, 48, 3)
    assert float(np.abs(got - want).max()) <= 2e-5  # 3.3e-6 measured
    plain = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    base = plain(prompts, images, generator=torch.Generator().manual_seed(5), **CALL).images
    assert float(np.abs(base - want).max()) > 0.01  # the LoRA changes the picture
    # Both networks changed, and the model is another fingerprint (the cache's key).
    modules = {"unet": ours.backend.unet_model, "text_encoder": ours.backend.text_encoder}
    for part, module in modules.items():  # no LoRA layer left, the weights changed
        fused, own = module.state_dict(), tiny[part].state_dict()
        assert fused.keys() == own.keys()
        assert any(not torch.equal(fused[k], own[k]) for k in own), part


def test_loras_add_up_and_a_pickle_needs_allow_pickle(tiny, lora_file, tmp_path):
    """Two LoRAs at 0.5 and 0.2 are one at 0.7 (scales add, as diffusers' set_adapters);
    the same tensors in a .bin load only with allow_pickle, and fuse to the same model."""
    once = load_components(ModelSource("tiny", loras=((str(lora_file), 0.7),)))
    halves = ((str(lora_file), 0.5), (str(lora_file), 0.2))
    twice = load_components(ModelSource("tiny", loras=halves))
    for part in ("unet", "text_encoder"):
        a, b = once[part].state_dict(), twice[part].state_dict()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert model_fingerprint(once) != model_fingerprint(tiny)
    from safetensors.torch import load_file

    pickled = tmp_path / "style.bin"
    torch.save(load_file(str(lora_file)), pickled)
    with pytest.raises(InvalidInputError, match="is not .safetensors: a pickle.*--allow-pickle"):
        load_components(ModelSource("tiny", loras=((str(pickled), 0.7),)))
    trusted = load_components(ModelSource("tiny", allow_pickle=True, loras=((str(pickled), 0.7),)))
    assert model_fingerprint(trusted) == model_fingerprint(once)
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(InvalidInputError, match="text.pt is not a readable tensor file"):
        load_components(
            ModelSource("tiny", allow_pickle=True, loras=((str(tmp_path / "text.pt"), 1),))
        )


def _kohya(state: dict) -> dict:
    """The same LoRA in kohya's layout, as A1111 and community sites keep LoRAs
    (lora_unet_..., lora_te_text_model_..., lora_down/lora_up, an alpha per layer)."""
    kohya = {}
    for key, tensor in state.items():
        part, rest = key.split(".", 1)
        layer, kind = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        name = prefix + layer.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(4.0)  # alpha = rank: a scale of 1
    return kohya


def test_layouts_of_other_tools_fuse_to_the_same_model(lora_file, tmp_path):
    """kohya's layout (A1111's LoRAs), and diffusers' own saved before transformers 5.6
    (text_encoder.text_model.*), fuse to the same weights, text encoder included."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_file))
    older = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in state.items()}
    save_file(_kohya(state), tmp_path / "kohya.safetensors")
    save_file(older, tmp_path / "older.safetensors")
    want = load_components(ModelSource("tiny", loras=((str(lora_file), 0.7),)))
    for name in ("kohya", "older"):
        file = str(tmp_path / f"{name}.safetensors")
        got = load_components(ModelSource("tiny", loras=((file, 0.7),)))
        for part in ("unet", "text_encoder"):
            a, b = want[part].state_dict(), got[part].state_dict()
            assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0, (name, part)


# The UNet layers LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) adapts: attention, the
# transformer blocks' projections, and the convolutions and time projections of every ResNet,
# downsampler and upsampler.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
    "upsamplers.0.conv",
]  # fmt: skip


def test_an_lcm_lora_runs_a_few_unguided_lcm_steps_as_diffusers(images, tmp_path):
    """LCM-LoRA's recipe (diffusers' docs): the LoRA, scheduler lcm, 4 steps, guidance 1
    (the prompt row alone). A LoRA on LCM-LoRA's layers, convolutions included, in kohya's
    layout: fused, it gives diffusers' image of it unfused in diffusers' layout."""
    pytest.importorskip("peft", reason="peft (sdtrt[lora]) is not installed")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    unet = load_components("tiny")["unet"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LCM_LORA_TARGETS), unet)
    torch.manual_seed(11)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    layers = get_peft_model_state_dict(unet)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in layers.values())  # 3x3 convolutions
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    diffusers_layout = tmp_path / "pytorch_lora_weights.safetensors"
    kohya = tmp_path / "lcm-lora.safetensors"
    save_file(_kohya(load_file(str(diffusers_layout))), kohya)
    ours = Img2ImgPipeline.from_pretrained(
        ModelSource("tiny", loras=((str(kohya), 1.0),)), scheduler="lcm", show_progress=False
    )
    reference = diffusers_img2img(load_components("tiny"), "lcm")
    reference.load_lora_weights(str(diffusers_layout), adapter_name="lcm")
    call = dict(strength=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    got = ours("a red circle", images[0], generator=torch.Generator().manual_seed(2), **call)
    want = reference("a red circle", images[0], generator=torch.Generator().manual_seed(2), **call)
    assert got.unet_calls == 2  # int(4 * 0.5) steps, one UNet call each
    assert float(np.abs(got.images - want.images).max()) <= 2e-5
    reference.unload_lora_weights()
    without = reference(
        "a red circle", images[0], generator=torch.Generator().manual_seed(2), **call
    )
    assert float(np.abs(without.images - want.images).max()) > 0.01  # the LoRA changes it


def test_a_lora_that_cannot_apply_is_refused(lora_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_file))

    def widened(key, tensor):  # lora_A takes 3 more inputs than the layer has
        return torch.zeros(tensor.shape[0], tensor.shape[1] + 3) if "lora_A" in key else tensor

    wider = {key: widened(key, tensor) for key, tensor in state.items()}
    save_file(wider, tmp_path / "wider.safetensors")
    save_file({"foo.lora_A.weight": torch.zeros(4, 8)}, tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "wider": "does not fit this model: .*size mismatch .*\\(and \\d+ more lines\\)",
        "other": "changes no layer of this model",
        "broken": "is not a readable safetensors file",
    }
    for name, message in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            file = str(tmp_path / f"{name}.safetensors")
            load_components(ModelSource("tiny", loras=((file, 1),)))
    with pytest.raises(ModelNotFoundError, match="LoRA file .*missing.safetensors does not exist"):
        load_components(ModelSource("tiny", loras=((str(tmp_path / "missing.safetensors"), 1),)))
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'sdtrt\[lora\]'"):
        load_components(ModelSource("tiny", loras=((str(lora_file), 1),)))


def test_lora_option_parsing_and_the_export_record(
    lora_file, tmp_path, monkeypatch, capsys, fast_export
):
    """`--lora FILE[:SCALE]` (scale 1 by default; a colon in a path stays); an export
    records each LoRA by absolute path and scale, and refuses --lora when it runs."""
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("a.safetensors:-0.5") == ("a.safetensors", -0.5)
    assert parse_lora("/x:y/a.safetensors") == ("/x:y/a.safetensors", 1.0)
    with pytest.raises(InvalidInputError, match="scale must be a finite number, got nan"):
        parse_lora("a.safetensors:nan")
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for any bad value
        main(["img2img", "--lora", "a.safetensors:inf"])
    assert exited.value.code == 2
    assert "argument --lora: LoRA a.safetensors: the scale must be a finite" in (
        capsys.readouterr().err
    )

    from sdtrt.export.folder import ExportedModel

    monkeypatch.chdir(lora_file.parent)
    out = tmp_path / "styled"
    given = ["--lora", f"{lora_file.name}:0.7", "--precision", "fp32", "--no-progress"]
    assert main(["export", "--model", "tiny", "--out", str(out), *given]) == 0
    source = json.loads((out / "sdtrt.json").read_text())["source"]
    assert source["loras"] == [[str(lora_file), 0.7]]
    assert source["fingerprint"] == model_fingerprint(
        load_components(ModelSource("tiny", loras=((str(lora_file), 0.7),)))
    )
    with pytest.raises(InvalidInputError, match="--lora: for the PyTorch weights"):
        ExportedModel.open_as(ModelSource(str(out), loras=((str(lora_file), 0.7),)))
    # check's and bench's reference: the manifest's model, LoRA fused (else "exported from
    # another model")
    assert model_fingerprint(ExportedModel.open(out).source_components()) == source["fingerprint"]


# Textual inversion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """A three-vector embedding in A1111's safetensors layout (one emb_params tensor), and a
    one-vector one in diffusers' layout (its token and its vectors)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    width = load_components("tiny")["text_encoder"].config.hidden_size
    draw = torch.Generator().manual_seed(7)
    save_file({"emb_params": torch.randn(3, width, generator=draw)}, folder / "Shiny.safetensors")
    save_file({"<dull>": torch.randn(1, width, generator=draw)}, folder / "learned.safetensors")
    return folder


def test_embeddings_give_diffusers_image_for_their_tokens(tiny, images, embedding_files):
    """Prompt and negative prompt calling a three-vector and a one-vector embedding: the
    image diffusers gives with the same files loaded by load_textual_inversion (a lower-case
    token, which diffusers' own prompt expansion finds)."""
    shiny = str(embedding_files / "Shiny.safetensors")
    dull = str(embedding_files / "learned.safetensors")
    source = ModelSource("tiny", embeddings=((shiny, "shiny"), (dull, "<dull>")))
    ours = Img2ImgPipeline.from_pretrained(source, scheduler="euler", show_progress=False)
    reference = diffusers_img2img(load_components("tiny"), "euler")
    reference.load_textual_inversion(shiny, token="shiny")
    reference.load_textual_inversion(dull)  # its own token, <dull>
    prompts, negatives = ["a shiny red circle", "a cat"], ["<dull>", "blurry shiny"]
    got = ours(prompts, images, negative_prompt=negatives,
               generator=torch.Generator().manual_seed(2), **CALL).images  # fmt: skip
    want = reference(prompts, images, negative_prompt=negatives,
                     generator=torch.Generator().manual_seed(2), **CALL).images  # fmt: skip
    assert got.shape == want.shape == (2, 32, 48, 3)
    assert float(np.abs(got - want).max()) == 0.0
    plain = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    base = plain(prompts, images, negative_prompt=negatives,
                 generator=torch.Generator().manual_seed(2), **CALL).images  # fmt: skip
    assert float(np.abs(base - want).max()) > 0.01  # the embeddings change the picture


def test_a_token_of_several_vectors_stands_for_all_of_them(embedding_files, caplog):
    """ "Shiny" (A1111's default: the file's name) is the piece "shiny" to transformers 5's
    tokenizer, which diffusers' text expansion misses: the ids are expanded instead.
    Prompts without such tokens, long ones included, get the tokenizer's own ids."""
    import logging

    from sdtrt.runtime.steps import _expanded_ids, token_ids

    source = ModelSource("tiny", embeddings=(str(embedding_files / "Shiny.safetensors"),))
    assert source.embeddings[0][1] == "Shiny"
    tokenizer = load_components(source)["tokenizer"]
    shiny = [tokenizer.convert_tokens_to_ids(t) for t in ("Shiny", "Shiny_1", "Shiny_2")]
    ids = token_ids(tokenizer, ["a Shiny cat"])
    plain = tokenizer(["a cat"]).input_ids[0]  # start, a, cat, end
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [*plain[:2], *shiny, *plain[2:]]
    assert ids[0, 7:].tolist() == [tokenizer.pad_token_id] * 70
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    # diffusers' expansion of the text leaves it as it is: one vector of three.
    convert = TextualInversionLoaderMixin._maybe_convert_prompt
    assert convert(None, "a Shiny cat", tokenizer) == "a Shiny cat"
    words = ["a red circle on a blue background"] * 12  # 84 tokens: truncated
    for prompts in (["a cat", ""], [" ".join(words)]):
        want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)
        assert _expanded_ids(tokenizer, prompts, {}).tolist() == want.input_ids
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdtrt.runtime.steps"):
        long = token_ids(tokenizer, ["Shiny " * 80])
    assert long.shape == (1, 77) and long[0, -1] == tokenizer.eos_token_id
    assert long[0, 1:4].tolist() == shiny
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "a prompt is longer than the text encoder's 77 tokens and was truncated"
    ]


def test_an_embedding_that_cannot_apply_is_refused(embedding_files, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(2, 16)}, tmp_path / "narrow.safetensors")
    save_file({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, tmp_path / "two.safetensors")
    shiny = str(embedding_files / "Shiny.safetensors")
    cases = {
        "narrow": (
            (str(tmp_path / "narrow.safetensors"), "n"),
            "vectors of 16 values, and this text encoder's are 32",
        ),  # fmt: skip
        "two": (
            (str(tmp_path / "two.safetensors"), "t"),
            "in no layout diffusers reads.*its keys: a, b",
        ),  # fmt: skip
        "taken": ((shiny, "x"), "'x' is already in the tokenizer's vocabulary.*FILE:TOKEN"),
    }
    for entry, message in cases.values():
        with pytest.raises(InvalidInputError, match=message):
            load_components(ModelSource("tiny", embeddings=(entry,)))
    with pytest.raises(InvalidInputError, match="'twice' is already in the tokenizer"):
        load_components(ModelSource("tiny", embeddings=((shiny, "twice"), (shiny, "twice"))))
    with pytest.raises(ModelNotFoundError, match="embedding file .*gone.pt does not exist"):
        load_components(ModelSource("tiny", embeddings=(str(tmp_path / "gone.pt"),)))
    with pytest.raises(InvalidInputError, match="the token must be one word"):
        parse_embedding("e.safetensors:two words")


def test_an_export_keeps_its_embeddings_in_its_tokenizer(embedding_files, tmp_path, fast_export):
    """The manifest records each embedding (absolute path, token); the export's tokenizer
    reads a prompt as the source's does; --embedding on the export is refused."""
    from sdtrt import api
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import ExportOptions
    from sdtrt.runtime.steps import token_ids

    shiny = str(embedding_files / "Shiny.safetensors")
    source = ModelSource("tiny", embeddings=(shiny,))
    out = tmp_path / "shiny"
    api.export(source, out, ExportOptions(precisions=("fp32",)), show_progress=False)
    assert json.loads((out / "sdtrt.json").read_text())["source"]["embeddings"] == [
        [shiny, "Shiny"]
    ]
    exported = ExportedModel.open(out)
    reference = exported.source_components()  # check's: the manifest's model, embedding added
    assert model_fingerprint(reference) == exported.manifest["source"]["fingerprint"]
    prompts = ["a Shiny cat", "blurry"]
    want = token_ids(load_components(source)["tokenizer"], prompts)
    assert torch.equal(token_ids(exported.tokenizer(), prompts), want)
    with pytest.raises(InvalidInputError, match="--embedding: for the PyTorch weights"):
        ExportedModel.open_as(ModelSource(str(out), embeddings=(shiny,)))


# Another VAE ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """The tiny VAE with other weights, as A1111 keeps a VAE (one file in the original
    layout: encoder.down.0.block.0...) and as a diffusers folder; and the VAE itself."""
    from ldm_layout import to_ldm_checkpoint
    from safetensors.torch import save_file

    components = load_components("tiny")
    vae = components["vae"]
    draw = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter += 0.01 * torch.randn(parameter.shape, generator=draw)
    folder = tmp_path_factory.mktemp("vae")
    ldm = to_ldm_checkpoint(components)
    prefix = "first_stage_model."
    alone = {k[len(prefix) :]: v for k, v in ldm.items() if k.startswith(prefix)}
    save_file(alone, folder / "ft.safetensors")
    vae.save_pretrained(folder / "ft")
    vae.save_pretrained(folder / "model" / "vae")  # as a diffusers model's folder holds it
    return folder, vae


def test_another_vae_gives_diffusers_image_with_that_vae(
    tiny, images, vae_files, tmp_path, monkeypatch, fast_export
):
    """`--vae FILE` (original layout, read with the model's VAE config) or `--vae DIR`: the
    image diffusers' pipeline gives with that VAE in place of the model's."""
    folder, vae = vae_files
    file_source = ModelSource("tiny", vae=str(folder / "ft.safetensors"))
    ours = Img2ImgPipeline.from_pretrained(file_source, scheduler="euler", show_progress=False)
    reference = diffusers_img2img({**load_components("tiny"), "vae": vae}, "euler")
    prompts = ["a red circle", "a cat"]
    got = ours(prompts, images, generator=torch.Generator().manual_seed(9), **CALL).images
    want = reference(prompts, images, generator=torch.Generator().manual_seed(9), **CALL).images
    assert got.shape == want.shape == (2, 32, 48, 3)
    assert float(np.abs(got - want).max()) == 0.0
    plain = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    base = plain(prompts, images, generator=torch.Generator().manual_seed(9), **CALL).images
    assert float(np.abs(base - want).max()) > 0.01
    from_file = model_fingerprint(load_components(file_source))
    from_folder = model_fingerprint(load_components(ModelSource("tiny", vae=str(folder / "ft"))))
    from_model = model_fingerprint(load_components(ModelSource("tiny", vae=str(folder / "model"))))
    assert from_file == from_folder == from_model != model_fingerprint(tiny)

    from sdtrt import api
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import ExportOptions

    monkeypatch.chdir(folder)
    out = tmp_path / "ft-export"
    fp32 = ExportOptions(precisions=("fp32",))
    api.export(ModelSource("tiny", vae="ft"), out, fp32, show_progress=False)
    exported = ExportedModel.open(out)
    assert exported.manifest["source"]["vae"] == str(folder / "ft")
    assert model_fingerprint(exported.source_components()) == from_folder
    with pytest.raises(InvalidInputError, match="--vae: for the PyTorch weights"):
        ExportedModel.open_as(ModelSource(str(out), vae="ft"))


def test_a_vae_that_cannot_replace_the_models_is_refused(vae_files, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    folder, vae = vae_files
    wide = AutoencoderKL.from_config({**vae.config, "latent_channels": 8})
    wide.save_pretrained(tmp_path / "wide")
    save_file({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    cases = {
        str(tmp_path / "wide"): (InvalidInputError, "latents of 8 channels at 1/8 .* takes 4"),
        str(tmp_path / "other.safetensors"): (
            InvalidInputError,
            "could not load the VAE .*missing",
        ),  # fmt: skip
        str(tmp_path / "vae.pt"): (
            InvalidInputError,
            "not .safetensors: a pickle.*--allow-pickle",
        ),  # fmt: skip
        str(tmp_path / "gone"): (ModelNotFoundError, "VAE .*gone does not exist"),
    }
    for path, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            load_components(ModelSource("tiny", vae=path))


# TAESD: the tiny autoencoder as the VAE ------------------------------------------------------


def test_taesd_gives_diffusers_image_with_it(tiny, images, taesd):
    """`--vae TAESD_DIR`: diffusers' AutoencoderTiny, whose encoder gives the latents (no
    draw, where AutoencoderKL's distribution is sampled): the image diffusers' pipeline
    gives with it, with one generator and with one per image (the draws that are left, the
    noise, in diffusers' order)."""
    folder, vae = taesd
    ours = Img2ImgPipeline.from_pretrained(
        ModelSource("tiny", vae=str(folder)), scheduler="euler_a", show_progress=False
    )
    assert not ours.dims.vae_samples and ours.scaling_factor == 1.0
    reference = diffusers_img2img({**load_components("tiny"), "vae": vae}, "euler_a")
    prompts = ["a red circle", "a cat"]
    # With one generator per image diffusers encodes each image alone (ours in one VAE
    # call): batched convolutions round differently, so not to the last bit there.
    for generators, bound in ((lambda: torch.Generator().manual_seed(9), 0.0), (
        lambda: [torch.Generator().manual_seed(s) for s in (9, 10)], 2e-5
    )):  # fmt: skip
        got = ours(prompts, images, generator=generators(), **CALL).images
        want = reference(prompts, images, generator=generators(), **CALL).images
        assert got.shape == want.shape == (2, 32, 48, 3)
        assert float(np.abs(got - want).max()) <= bound
    plain = Img2ImgPipeline.from_components(tiny, scheduler="euler_a", show_progress=False)
    base = plain(prompts, images, generator=torch.Generator().manual_seed(9), **CALL).images
    got = ours(prompts, images, generator=torch.Generator().manual_seed(9), **CALL).images
    assert float(np.abs(base - got).max()) > 0.01


def test_taesd_exports_runs_on_onnxruntime_and_is_adopted(taesd, taesd_exported, images, tmp_path):
    """Its encoder graph gives the latents [B, 4, h, w] (not a distribution's 8 channels);
    ONNX Runtime's image equals PyTorch's; a copy without sdtrt's manifest (as the Hugging
    Face layout is read) is known for a TAESD from its config."""
    import shutil

    from sdtrt.export.folder import MANIFEST, ExportedModel

    folder, _ = taesd
    io = taesd_exported.manifest["graphs"]["vae_encoder/model.onnx"]["io"]
    assert io["outputs"] == {"latents": {"dtype": "float32", "shape": ["B", 4, "h", "w"]}}
    assert taesd_exported.manifest["scaling_factor"] == 1.0
    assert taesd_exported.dims.vae_samples is False
    torch_pipe = Img2ImgPipeline.from_pretrained(
        ModelSource("tiny", vae=str(folder)), scheduler="euler", show_progress=False
    )
    ort_pipe = Img2ImgPipeline.from_pretrained(
        str(taesd_exported.root), "onnxruntime", scheduler="euler", show_progress=False
    )
    prompts = ["a red circle", "a cat"]
    want = torch_pipe(prompts, images, generator=torch.Generator().manual_seed(3), **CALL).images
    got = ort_pipe(prompts, images, generator=torch.Generator().manual_seed(3), **CALL).images
    assert got.shape == want.shape == (2, 32, 48, 3)
    # Measured: 3.0e-5 with the shipped TAESD (4.1e-6 with the first, trained on pictures
    # alone: its decoder amplifies fp32 rounding less); 1e-4 is 1/40 of an 8-bit level.
    assert float(np.abs(got - want).max()) < 1e-4

    copy = tmp_path / "hf-layout"
    shutil.copytree(taesd_exported.root, copy)
    (copy / MANIFEST).unlink()
    adopted = ExportedModel.open(copy)
    assert adopted.dims == taesd_exported.dims
    assert adopted.network("vae_encoder", "fp32").output_name == "latents"


def test_a_taesd_that_cannot_replace_the_models_vae_is_refused(tmp_path):
    """The encoder and the decoder each set a scale (their own block lists): a TAESD whose
    encoder downsamples less than the model's VAE, or of other latent channels, is refused."""
    from diffusers import AutoencoderTiny

    sizes = dict(num_decoder_blocks=(1,) * 4, decoder_block_out_channels=(8,) * 4)
    AutoencoderTiny(
        num_encoder_blocks=(1,) * 3, encoder_block_out_channels=(8,) * 3, **sizes
    ).save_pretrained(tmp_path / "shallow")
    AutoencoderTiny(
        latent_channels=16,
        num_encoder_blocks=(1,) * 4,
        encoder_block_out_channels=(8,) * 4,
        **sizes,
    ).save_pretrained(tmp_path / "wide")
    cases = {
        "shallow": "latents of 4 channels at 1/4 and 1/8 of the image's size; .* 4 channels at 1/8",
        "wide": "latents of 16 channels at 1/8 .* takes 4 channels",
    }
    for name, message in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            load_components(ModelSource("tiny", vae=str(tmp_path / name)))


class _Block(torch.nn.Module):
    """TAESD's block as madebyollin/taesd's taesd.py defines it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        conv = [torch.nn.Conv2d(n, n, 3, padding=1) for _ in range(3)]
        self.conv = torch.nn.Sequential(conv[0], torch.nn.ReLU(), conv[1], torch.nn.ReLU(), conv[2])
        self.skip = torch.nn.Identity()
        self.fuse = torch.nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def _original_taesd(latent_channels: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    """TAESD's encoder and decoder in its own layout (taesd.py): images in [0, 1], the
    decoder's first layer a clamp (3 tanh(x / 3))."""

    class Clamp(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    def conv(n_in, n_out, **kwargs):
        return torch.nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    encoder = torch.nn.Sequential(
        conv(3, 64), _Block(64),
        conv(64, 64, stride=2, bias=False), _Block(64), _Block(64), _Block(64),
        conv(64, 64, stride=2, bias=False), _Block(64), _Block(64), _Block(64),
        conv(64, 64, stride=2, bias=False), _Block(64), _Block(64), _Block(64),
        conv(64, latent_channels),
    )  # fmt: skip
    decoder = torch.nn.Sequential(
        Clamp(), conv(latent_channels, 64), torch.nn.ReLU(),
        _Block(64), _Block(64), _Block(64), torch.nn.Upsample(scale_factor=2),
        conv(64, 64, bias=False),
        _Block(64), _Block(64), _Block(64), torch.nn.Upsample(scale_factor=2),
        conv(64, 64, bias=False),
        _Block(64), _Block(64), _Block(64), torch.nn.Upsample(scale_factor=2),
        conv(64, 64, bias=False),
        _Block(64), conv(64, 3),
    )  # fmt: skip
    return encoder.eval(), decoder.eval()


def test_taesds_own_encoder_and_decoder_files_load_as_taesd(tmp_path):
    """A folder of TAESD's own files (taesd_encoder and taesd_decoder .safetensors, as
    madebyollin/taesd and ComfyUI's vae_approx hold them): the AutoencoderTiny read from
    them computes what the original networks compute (on [-1, 1] images, as diffusers'
    wraps them); .pth files are pickles (--allow-pickle); one half alone is refused."""
    from safetensors.torch import save_file

    from sdtrt.adapters import load_vae

    torch.manual_seed(3)
    encoder, decoder = _original_taesd()
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        save_file(module.state_dict(), tmp_path / f"taesd_{name}.safetensors")
    model_vae = load_components("tiny")["vae"]
    loaded = load_components(ModelSource("tiny", vae=str(tmp_path)))["vae"]
    assert type(loaded).__name__ == "AutoencoderTiny" and loaded.config.scaling_factor == 1.0
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(pixels).latents, encoder((pixels + 1) / 2), atol=1e-6)
        decoded = loaded.decode(latents).sample
        assert torch.allclose(decoded, decoder(latents) * 2 - 1, atol=1e-6)
    assert decoded.shape == (2, 3, 32, 48)

    for name, module in (("encoder", encoder), ("decoder", decoder)):
        (tmp_path / f"taesd_{name}.safetensors").unlink()
        torch.save(module.state_dict(), tmp_path / f"taesd_{name}.pth")
    with pytest.raises(InvalidInputError, match="taesd_encoder.pth is not .safetensors: a pickle"):
        load_vae(str(tmp_path), model_vae, allow_pickle=False)
    from_pickles = load_vae(str(tmp_path), model_vae, allow_pickle=True)
    for key, value in loaded.state_dict().items():
        assert torch.equal(from_pickles.state_dict()[key], value), key
    (tmp_path / "taesd_encoder.pth").unlink()
    with pytest.raises(InvalidInputError, match="holds taesd_decoder.pth alone: img2img needs"):
        load_vae(str(tmp_path), model_vae, allow_pickle=True)


def test_a_preview_vae_may_be_taesds_decoder_alone(tmp_path):
    """--preview-vae: TAESD's decoder file alone (as ComfyUI's vae_approx may keep it) decodes
    as the original network does; the encoder alone is refused."""
    from safetensors.torch import save_file

    from sdtrt.adapters import load_preview_vae

    torch.manual_seed(4)
    encoder, decoder = _original_taesd()
    save_file(decoder.state_dict(), tmp_path / "taesd_decoder.safetensors")
    loaded = load_preview_vae(str(tmp_path), 4, 8)
    latents = torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        decoded = loaded.decode(latents).sample
        assert torch.allclose(decoded, decoder(latents) * 2 - 1, atol=1e-6)
    (tmp_path / "taesd_decoder.safetensors").unlink()
    save_file(encoder.state_dict(), tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(InvalidInputError, match="previews are decoded by taesd_decoder"):
        load_preview_vae(str(tmp_path), 4, 8)
