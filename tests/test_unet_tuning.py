"""The torch backend's UNet switches (channels-last, fused QKV, torch.compile): each changes
how the UNet runs, not what it computes. Proven here on the CPU against the plain module;
which are faster is measured on a GPU (bench/README.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from sdtrt.engine import torch_backend
from sdtrt.options import TorchOptions
from sdtrt.runtime.pipeline import Img2ImgPipeline

RUN = dict(num_inference_steps=8, strength=0.7, guidance_scale=5.0, output_type="latent")


def _latents(components, images, options):
    pipe = Img2ImgPipeline.from_components(components, options, show_progress=False)
    out = pipe("a yellow square", images[0], generator=torch.Generator().manual_seed(2), **RUN)
    return pipe.backend, out.images.numpy()


@pytest.fixture(scope="module")
def plain(tiny, images):
    return _latents(tiny, images, TorchOptions())[1]


def _own_copy(components):
    """The switches change the UNet module in place: the session's tiny model stays as is."""
    return {**components, "unet": copy.deepcopy(components["unet"])}


def test_channels_last(tiny, images, plain):
    backend, got = _latents(_own_copy(tiny), images, TorchOptions(channels_last=True))
    conv = backend.unet_model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)  # fp32 rounding


def test_fused_qkv(tiny, images, plain):
    backend, got = _latents(_own_copy(tiny), images, TorchOptions(fuse_qkv=True))
    attentions = [m for m in backend.unet_model.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in attentions)
    assert any(hasattr(a, "to_qkv") for a in attentions)  # self-attention: one projection
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)  # fp32 rounding


def test_compiled_unet(tiny, images, plain, monkeypatch):
    """Compiled by dynamo whole (fullgraph), once for the request's one shape; aot_eager
    stands in for inductor, which takes minutes on this CPU (the GPU measures inductor)."""
    monkeypatch.setattr(torch_backend, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    backend, got = _latents(_own_copy(tiny), images, TorchOptions(compile_unet=True))
    assert isinstance(backend.unet_call, torch._dynamo.eval_frame.OptimizedModule)
    assert counters["stats"]["unique_graphs"] == 1  # 8 steps, one compiled graph
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)  # fp32 rounding
    torch._dynamo.reset()


def test_fused_qkv_refused_clearly_where_diffusers_cannot(tiny, monkeypatch):
    from sdtrt.errors import InvalidInputError

    components = _own_copy(tiny)

    def refuse():
        raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV")

    monkeypatch.setattr(components["unet"], "fuse_qkv_projections", refuse)
    with pytest.raises(InvalidInputError, match="--fuse-qkv does not apply to this UNet: `fuse"):
        torch_backend.TorchBackend(components, TorchOptions(fuse_qkv=True))


def test_compiled_unet_takes_more_shapes_than_dynamo_allows_one_function(tiny, monkeypatch, caplog):
    """A server forms many UNet shapes (row counts x image sizes). dynamo compiles a function
    for 8 at most, and with fullgraph the 9th raised FailOnRecompileLimitHit: the backend
    raises that limit to COMPILED_SHAPES, and runs any shape past it eager. Both limits are
    made small here (2 and 3), so that five shapes cross them in seconds."""
    monkeypatch.setattr(torch_backend, "COMPILE_BACKEND", "eager")  # dynamo's tracing alone
    monkeypatch.setattr(torch_backend, "COMPILED_SHAPES", 3)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    components = _own_copy(tiny)
    plain = copy.deepcopy(components["unet"])
    backend = torch_backend.TorchBackend(components, TorchOptions(compile_unet=True))
    assert torch._dynamo.config.recompile_limit == 3
    width = plain.config.cross_attention_dim
    with caplog.at_level("WARNING", logger=torch_backend.__name__), torch.inference_mode():
        for rows in range(1, 6):
            sample = torch.randn(rows, 4, 4, 6, generator=torch.Generator().manual_seed(rows))
            hidden = torch.randn(rows, 77, width, generator=torch.Generator().manual_seed(9))
            steps = torch.full((rows,), 500.0)
            got = backend.unet(sample, steps, hidden)
            want = plain(sample, steps, encoder_hidden_states=hidden).sample
            assert got.shape == (rows, 4, 4, 6)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    eager = [r for r in caplog.records if "run eager" in r.getMessage()]
    assert len(eager) == 1 and "4x4x4x6" in eager[0].getMessage()  # the 4th shape, said once
    torch._dynamo.reset()
