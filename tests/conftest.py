from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import PIL.Image
import pytest

from sdtrt.models import build_tiny, build_tiny_trained


@pytest.fixture(scope="session", autouse=True)
def empty_hugging_face_cache(tmp_path_factory):
    """The tests see an empty Hugging Face cache, not the machine's: a Hub id sdtrt finds
    there (ModelSource) must not load a real model that happens to be downloaded here."""
    import os

    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-hub-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        patch.setitem(os.environ, "HF_HUB_CACHE", str(cache))  # subprocesses too
        yield cache


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model (trained weights); tests must not modify it."""
    return build_tiny_trained()


@pytest.fixture(scope="module")
def pipe(tiny: Any) -> Any:
    """A torch pipeline of the tiny model, one per test module (its scheduler holds state)."""
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    return Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)


@pytest.fixture(scope="session")
def tiny_random():
    """The tiny architecture with random weights (``tiny-random``)."""
    return build_tiny()


@pytest.fixture(scope="session")
def taesd():
    """The tiny model's TAESD (diffusers' AutoencoderTiny distilled from its VAE, shipped in
    sdtrt/assets/tiny-taesd): its diffusers folder (what ``--vae DIR`` reads), and the
    module as diffusers loads it."""
    from diffusers import AutoencoderTiny

    from sdtrt.models import TINY_TAESD_WEIGHTS

    return TINY_TAESD_WEIGHTS, AutoencoderTiny.from_pretrained(TINY_TAESD_WEIGHTS).eval()


@pytest.fixture(scope="session")
def taesd_exported(taesd, onnx_cache):
    """The tiny model with TAESD as its VAE, exported in fp32 through the cache."""
    from sdtrt.export.cache import exported_for
    from sdtrt.models import load_components
    from sdtrt.options import CacheOptions
    from sdtrt.source import ModelSource

    source = ModelSource("tiny", vae=str(taesd[0]))
    cache = CacheOptions(cache_dir=str(onnx_cache), source=source)
    return exported_for(load_components(source), precision="fp32", cache=cache)


@pytest.fixture(scope="session")
def images():
    """Two random RGB images of a size the tiny model takes (multiples of 16)."""
    rng = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(2)
    ]


def noise_picture(seed: int, height: int = 32, width: int = 48) -> PIL.Image.Image:
    """A picture of random pixels, the same for a seed (a server test's input)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def png_bytes(image: PIL.Image.Image) -> bytes:
    """An image as a PNG file's bytes (an HTTP request's body)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def v1_images(server: Any, image: PIL.Image.Image, fields: dict[str, Any]) -> list[np.ndarray]:
    """What ``/v1/img2img`` answers (in JSON) for ``image`` and ``fields``, as RGB pixel
    arrays: the reference a protocol adapter's test compares its images with. The server's
    key is ``secret`` where it wants one."""
    import base64

    import httpx

    body = {"image": base64.b64encode(png_bytes(image)).decode(), **fields}
    answer = httpx.post(
        f"{server.url}/v1/img2img",
        json={**body, "response_format": "json"},
        headers={"Authorization": "Bearer secret"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    pngs = [base64.b64decode(png) for png in answer.json()["images"]]
    return [np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_diffusers_folder(components, path, variant=None):
    """Write components as a diffusers folder (the layout ``load_components`` reads) that
    the transformers releases diffusers users have read too: transformers 5 saves the text
    encoder's weights without the ``text_model.`` prefix (4.57 then initialises all of them
    at random and only warns) and the tokenizer only in its fast format."""
    from pathlib import Path

    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import load_file, save_file

    from sdtrt.export.exporter import write_tokenizer

    pipe = StableDiffusionImg2ImgPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True, variant=variant)
    name = "model.safetensors" if variant is None else f"model.{variant}.safetensors"
    weights = Path(path, "text_encoder", name)
    state = load_file(weights)
    if not any(key.startswith("text_model.") for key in state):
        save_file({f"text_model.{k}": v for k, v in state.items()}, weights, {"format": "pt"})
    write_tokenizer(Path(path, "tokenizer"), components["tokenizer"])


def unet_variant(components, **changes):
    """``components`` with a UNet of their UNet's config but ``changes`` (random weights,
    seed 0): other kinds of UNet, other options, at the same tiny sizes."""
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    return {**components, "unet": UNet2DConditionModel(**{**config, **changes}).eval()}


def diffusers_img2img(components, scheduler: str):
    """diffusers' own pipeline on the same components: the reference every test uses.
    ``scheduler``: sdtrt's name (its class and settings) or a diffusers class name."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    from sdtrt.runtime.schedulers import SCHEDULERS, diffusers_scheduler

    config = components["scheduler"].config
    if scheduler in SCHEDULERS:
        scheduler = diffusers_scheduler(scheduler, config)
    else:
        scheduler = getattr(diffusers, scheduler).from_config(config)
    pipe = StableDiffusionImg2ImgPipeline(
        **{**components, "scheduler": scheduler},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sdtrt-cache")


@pytest.fixture(scope="session")
def exported(tiny, onnx_cache):
    """The tiny model exported in fp32 through the cache (about a minute on 2 cores)."""
    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    cache = CacheOptions(cache_dir=str(onnx_cache), source="tiny")
    return exported_for(tiny, precision="fp32", cache=cache)


@pytest.fixture(scope="session")
def exported_fp16(tiny, tmp_path_factory):
    from sdtrt.export.exporter import export_model
    from sdtrt.export.folder import ExportedModel

    folder = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    from sdtrt.options import ExportOptions

    options = ExportOptions(precisions=("fp16",))
    export_model(tiny, folder, source="tiny", options=options, show_progress=False)
    return ExportedModel.open(folder)


def fake_network_export(network, module, path, *, precision, opset):
    """An empty graph: what the manifest reads of it (I/O, opset) without torch.export."""
    from onnx import helper

    path.parent.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph([], f"{network.name}-{precision}", [], [])
    path.write_bytes(helper.make_model(graph).SerializeToString())


@pytest.fixture
def fast_export(monkeypatch):
    """export_model's folder handling and manifest, without the minute of torch.export."""
    monkeypatch.setattr("sdtrt.export.exporter.export_network", fake_network_export)


@contextmanager
def serving(pipe: Any, options: Any) -> Iterator[Any]:
    """``sdtrt serve``'s app over ``pipe`` with ``options`` on a loopback port, warmed up:
    the running server, with its ``app``, ``batcher`` (and ``grpc``, the gRPC address, where
    it serves gRPC)."""
    from sdtrt.serve.app import create_app
    from sdtrt.serve.batcher import StepBatcher
    from sdtrt.serve.server import BackgroundServer

    app = create_app(StepBatcher(pipe, options), options)
    with BackgroundServer(app, tls=options.tls) as running:
        running.wait_ready()
        running.app, running.batcher = app, app.state.batcher
        if options.grpc_port is not None:
            running.grpc = f"127.0.0.1:{app.state.grpc_port}"
        yield running


def held_mid_call(
    module: Any, name: str, send: Callable[[], Any], probe: Callable[[], None]
) -> Any:
    """``send()`` (a request) in a thread while ``module.name`` is held in the middle of
    its call; ``probe()`` runs meanwhile (what must not wait for it); ``send``'s answer."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(module, name)

    def held(*args: Any) -> Any:
        entered.set()
        assert release.wait(timeout=30)
        return original(*args)

    answers: list[Any] = []
    client = threading.Thread(target=lambda: answers.append(send()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, held)
        client.start()
        try:
            assert entered.wait(timeout=30)
            probe()
        finally:
            release.set()
            client.join(timeout=60)
    return answers[0]


def pipeline_reference(tiny: Any, request: Any, image: Any) -> np.ndarray:
    """The single-request pipeline on the same arguments as a server's request: what the
    request must give (its first image). It runs with the worker's intra-op thread count
    (PyTorch's CPU kernels split their sums by thread count: 1 and 2 threads differ by
    about 1e-6)."""
    return pipeline_reference_images(tiny, request, image)[0]


def pipeline_reference_images(tiny: Any, request: Any, image: Any) -> Any:
    """The pipeline's images for ``request`` (``pipeline_reference``), all of them."""
    import torch

    from sdtrt.runtime.guidance import cutoff_callback
    from sdtrt.runtime.pipeline import Img2ImgPipeline
    from sdtrt.serve.batcher import intra_op_threads
    from sdtrt.serve.options import ServeOptions

    pipe = Img2ImgPipeline.from_components(
        tiny, "torch", scheduler=request.scheduler, show_progress=False
    )
    with intra_op_threads(ServeOptions.intra_op_threads):
        return pipe(
            request.prompt,
            image,
            strength=request.strength,
            start_step=request.start_step,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            negative_prompt=request.negative_prompt,
            eta=request.eta,
            generator=torch.Generator().manual_seed(request.seed),
            output_type="np",
            height=request.height,
            width=request.width,
            timesteps=None if request.timesteps is None else list(request.timesteps),
            sigmas=None if request.sigmas is None else list(request.sigmas),
            callback_on_step_end=cutoff_callback(request.guidance_cutoff),
            num_images_per_prompt=request.num_images_per_prompt,
        ).images
