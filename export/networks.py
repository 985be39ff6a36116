"""One class per network: its ONNX contract (I/O names, dynamic axes, sample input, valid
ranges) and the thin torch wrapper that gives the network that signature.

As in NVIDIA's demo/Diffusion ``base_model.py``: the exporter, the engine builder and the
runners all read the contract from here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# Dynamic axes by name. A derived axis is a multiple of a free one: the UNet's latent
# height is 2^(downsamplers) x a free size, or its skip concatenations cannot line up.
Axis = tuple[str, int]  # (name in the ONNX graph, multiple it must be of)


@dataclass(frozen=True)
class ModelDims:
    """The sizes every contract needs, read off the PyTorch components once."""

    text_hidden_size: int
    """C: the text encoder's width, the UNet's cross-attention width (768 SD 1.x)."""
    latent_channels: int
    vae_scale_factor: int
    """Pixels per latent along each side (8 for SD)."""
    unet_factor: int
    """2^(UNet downsamplers): latent sizes must be multiples of this."""
    max_tokens: int = 77

    @property
    def size_multiple(self) -> int:
        """Height and width in pixels must be multiples of this (64 SD, 16 tiny)."""
        return self.vae_scale_factor * self.unet_factor

    @classmethod
    def from_components(cls, components: dict[str, Any]) -> ModelDims:
        unet, vae = components["unet"].config, components["vae"].config
        return cls(
            text_hidden_size=components["text_encoder"].config.hidden_size,
            latent_channels=vae.latent_channels,
            vae_scale_factor=2 ** (len(vae.block_out_channels) - 1),
            unet_factor=2 ** (len(unet.down_block_types) - 1),
        )


class Network:
    """A network's contract. ``inputs``/``outputs`` map each name to its axes: an int is a
    fixed size, an ``Axis`` a dynamic one."""

    name: ClassVar[str]
    component: ClassVar[str]  # which of load_components' entries it wraps
    keep_fp32_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dims: ModelDims) -> None:
        self.dims = dims

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        raise NotImplementedError

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        raise NotImplementedError

    def input_dtype(self, name: str, precision: str) -> torch.dtype:
        if precision == "fp16" and name not in self.keep_fp32_inputs:
            return torch.float16
        return torch.float32

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Concrete input and output shapes for a request of ``batch`` images of
        ``height`` x ``width`` pixels (the UNet's batch is 2B)."""
        sizes = self.axis_sizes(batch, height, width)
        return {
            name: tuple(sizes[a[0]] if isinstance(a, tuple) else a for a in axes)
            for name, axes in {**self.inputs, **self.outputs}.items()
        }

    def output_shape(self, input_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The output's shape for these input shapes, read through the axis names (what an
        ONNX Runtime I/O binding must allocate before the run)."""
        named = {
            axis[0]: size
            for name, axes in self.inputs.items()
            for axis, size in zip(axes, input_shapes[name], strict=True)
            if isinstance(axis, tuple)
        }
        f = self.dims.vae_scale_factor
        batch = named.get("B", named.get("2B", 0) // 2)
        height = named.get("H", named.get("h", 0) * f)
        width = named.get("W", named.get("w", 0) * f)
        (output,) = self.outputs
        return self.shapes(batch, height, width)[output]

    def axis_sizes(self, batch: int, height: int, width: int) -> dict[str, int]:
        f = self.dims.vae_scale_factor
        return {
            "B": batch,
            "2B": 2 * batch,
            "H": height,
            "W": width,
            "h": height // f,
            "w": width // f,
        }

    def sample_inputs(
        self, precision: str, batch: int = 2, height: int = 0, width: int = 0, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the contract's dtypes for a shape in range. Export uses a batch
        of 2: torch.export specialises any dimension whose example value is 1."""
        height = height or 2 * self.dims.size_multiple
        width = width or 3 * self.dims.size_multiple
        shapes = self.shapes(batch, height, width)
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for name in self.inputs:
            if name == "input_ids":
                out[name] = torch.randint(
                    0, 400, shapes[name], dtype=torch.int32, generator=generator
                )
            elif name == "timestep":
                out[name] = torch.tensor([500.0], dtype=torch.float32)
            else:
                t = torch.randn(shapes[name], generator=generator)
                out[name] = t.to(self.input_dtype(name, precision))
        return out


class TextEncoder(Network):
    name = "text_encoder"
    component = "text_encoder"

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        return {"input_ids": [("B", 1), self.dims.max_tokens]}

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        return {"last_hidden_state": [("B", 1), self.dims.max_tokens, self.dims.text_hidden_size]}

    def input_dtype(self, name: str, precision: str) -> torch.dtype:
        return torch.int32

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return _TextEncoderWrapper(module)


class UNet(Network):
    name = "unet"
    component = "unet"
    # Fractional timesteps (LMS, Euler) must not be rounded to fp16.
    keep_fp32_inputs = ("timestep",)

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        u, c = self.dims.unet_factor, self.dims.latent_channels
        return {
            "sample": [("2B", 1), c, ("h", u), ("w", u)],
            "timestep": [1],
            "encoder_hidden_states": [("2B", 1), self.dims.max_tokens, self.dims.text_hidden_size],
        }

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        u, c = self.dims.unet_factor, self.dims.latent_channels
        return {"out_sample": [("2B", 1), c, ("h", u), ("w", u)]}

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return _UNetWrapper(module)


class VaeEncoder(Network):
    name = "vae_encoder"
    component = "vae"

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        f = self.dims.size_multiple
        return {"sample": [("B", 1), 3, ("H", f), ("W", f)]}

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        u = self.dims.unet_factor
        return {"latent_parameters": [("B", 1), 2 * self.dims.latent_channels, ("h", u), ("w", u)]}

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return _VaeEncoderWrapper(module)


class VaeDecoder(Network):
    name = "vae_decoder"
    component = "vae"

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        u = self.dims.unet_factor
        return {"latent_sample": [("B", 1), self.dims.latent_channels, ("h", u), ("w", u)]}

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        f = self.dims.size_multiple
        return {"sample": [("B", 1), 3, ("H", f), ("W", f)]}

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return _VaeDecoderWrapper(module)


NETWORKS: tuple[type[Network], ...] = (TextEncoder, UNet, VaeEncoder, VaeDecoder)
NETWORK_NAMES = tuple(n.name for n in NETWORKS)
VAE_NETWORKS = ("vae_encoder", "vae_decoder")


def networks_for(dims: ModelDims) -> dict[str, Network]:
    return {cls.name: cls(dims) for cls in NETWORKS}


class _TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # int32 in the graph (what TensorRT binds natively), int64 for the embedding lookup.
        return self.text_encoder(input_ids.long())[0]


class _UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]


class _VaeEncoderWrapper(torch.nn.Module):
    """Returns the latent distribution's parameters (mean, logvar), not a sample: the
    runtime samples with the caller's generator, so results stay reproducible."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class _VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]
