"""One class per network: its ONNX contract (I/O names, dynamic axes, sample input, valid
ranges) and the thin torch wrapper that gives the network that signature.

As in NVIDIA's demo/Diffusion ``base_model.py``: the exporter, the engine builder and the
runners all read the contract from here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtrt.errors import GraphIntegrityError, InvalidInputError, UnsupportedModelError

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
    vae_samples: bool = True
    """The VAE encoder gives a distribution (mean and log-variance, 2 x latent channels)
    that the runtime samples, as AutoencoderKL's does; False: it gives the latents
    themselves, as TAESD's AutoencoderTiny does (no draw)."""

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
            vae_samples=not is_tiny_vae(vae),
        )


def is_tiny_vae(config: Mapping[str, Any]) -> bool:
    """Whether a VAE config (a module's, or its config.json read) is TAESD's
    AutoencoderTiny, whose encoder gives latents rather than a distribution. Its config is
    the one with encoder and decoder block lists of their own."""
    return "encoder_block_out_channels" in config


# UNets of other Stable Diffusion pipelines take more input channels than the latents:
# what they add, by their channel count.
_WIDER_UNETS = {
    5: "a depth-to-image UNet (latents and a depth map)",
    7: "an upscaler's UNet (latents and the low-resolution image)",
    8: "an InstructPix2Pix UNet (latents and the input image's latents)",
    9: "an inpainting UNet (latents, mask and masked image)",
}


def check_unet_config(
    unet: Mapping[str, Any], latent_channels: int, text_width: int, where: str
) -> None:
    """Refuse a UNet that takes more than sdtrt's img2img feeds it (latents of the VAE's
    channels, one timestep, the text encoder's hidden states), naming what it takes:
    the UNets of inpainting, SDXL, upscaler and LCM models. ``unet`` is its config."""
    problems = []
    channels = unet.get("in_channels")
    if channels != latent_channels:
        kind = _WIDER_UNETS.get(channels) if isinstance(channels, int) else None
        problems.append(
            f"its UNet takes {channels} input channels where the VAE's latents have "
            f"{latent_channels}" + (f", as {kind} does" if kind else "")
        )
    if unet.get("out_channels") != latent_channels:
        problems.append(f"its UNet gives {unet.get('out_channels')} output channels")
    attends = unet.get("cross_attention_dim")
    if set(attends if isinstance(attends, list | tuple) else [attends]) != {text_width}:
        problems.append(
            f"its UNet attends to text states {attends} wide, the text encoder gives {text_width}"
        )
    if unet.get("addition_embed_type") is not None:
        problems.append(
            f"its UNet takes added conditions ({unet['addition_embed_type']!r}: SDXL's "
            "pooled text and size embeddings)"
        )
    if unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None:
        problems.append("its UNet takes class labels (an upscaler's noise level)")
    if unet.get("time_cond_proj_dim") is not None:
        problems.append(
            "its UNet takes a guidance-scale embedding (an LCM-distilled UNet), where sdtrt "
            "runs classifier-free guidance on [uncond, cond] rows (LCM-LoRA on an SD model "
            "runs: --lora FILE --scheduler lcm)"
        )
    if unet.get("encoder_hid_dim_type") is not None:
        problems.append(f"its UNet projects the text states ({unet['encoder_hid_dim_type']!r})")
    if problems:
        raise UnsupportedModelError(
            f"{where} is not a model sdtrt runs: {'; '.join(problems)}. sdtrt runs Stable "
            "Diffusion 1.x and 2.x text-to-image models (4-channel latents, a UNet "
            "conditioned on CLIP text states alone)"
        )


_ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64"}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}


@dataclass(frozen=True)
class GraphIO:
    """What one ONNX graph takes and gives, read from the graph: dtype and shape (an int
    fixed, a str a named dynamic axis) by name. sdtrt's graphs and optimum's differ here
    (int32 or int64 token ids, a per-row or a scalar timestep, extra outputs); the contract
    adapts to what the graph says instead of each backend special-casing a producer."""

    inputs: dict[str, tuple[str, tuple[int | str, ...]]]
    outputs: dict[str, tuple[str, tuple[int | str, ...]]]

    @classmethod
    def read(cls, path: Path) -> GraphIO:
        return cls.of(load_graph(path).graph)

    @classmethod
    def of(cls, graph: Any) -> GraphIO:
        """From an ``onnx.GraphProto``."""

        def describe(values: Any) -> dict[str, tuple[str, tuple[int | str, ...]]]:
            out = {}
            for v in values:
                t = v.type.tensor_type
                dtype = _ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}")
                out[v.name] = (dtype, tuple(d.dim_param or d.dim_value for d in t.shape.dim))
            return out

        initializers = {i.name for i in graph.initializer}
        inputs = [v for v in graph.input if v.name not in initializers]
        return cls(describe(inputs), describe(graph.output))

    def to_json(self) -> dict[str, Any]:
        return {
            kind: {n: {"dtype": d, "shape": list(s)} for n, (d, s) in values.items()}
            for kind, values in (("inputs", self.inputs), ("outputs", self.outputs))
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphIO:
        def values(kind: str) -> dict[str, tuple[str, tuple[int | str, ...]]]:
            return {n: (v["dtype"], tuple(v["shape"])) for n, v in data[kind].items()}

        return cls(values("inputs"), values("outputs"))


def load_graph(path: Path) -> Any:
    """An ONNX model without its external weights (what describing it needs)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a damaged file
        raise GraphIntegrityError(f"{path} is not a readable ONNX graph: {exc}") from exc


class Network:
    """A network's contract. ``inputs``/``outputs`` map each name to its axes: an int is a
    fixed size, an ``Axis`` a dynamic one. Without ``io`` it is the contract sdtrt exports;
    with the ``io`` of a graph it is that graph's (dtypes, timestep shape) as it runs."""

    name: ClassVar[str]
    component: ClassVar[str]  # which of load_components' entries it wraps
    keep_fp32_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dims: ModelDims, io: GraphIO | None = None) -> None:
        self.dims = dims
        self.io = io

    @property
    def output_name(self) -> str:
        """The output the pipeline uses (a graph may give more, as optimum's text encoder
        gives ``pooler_output``)."""
        return next(iter(self.outputs))

    def check_io(self, where: str) -> None:
        """Refuse a graph that lacks an input or the output this contract needs, naming
        them; dtypes outside int32/int64/float16/float32 are refused too."""
        if self.io is None:
            return
        for kind, needed, have in (
            ("input", self.inputs, self.io.inputs),
            ("output", {self.output_name: []}, self.io.outputs),
        ):
            missing = [n for n in needed if n not in have]
            if missing:
                raise GraphIntegrityError(
                    f"{where} has no {kind} {', '.join(missing)}: a {self.name} graph takes "
                    f"{', '.join(self.inputs)} and gives {self.output_name} "
                    f"(it has {', '.join(have) or 'none'})"
                )
        extra = [n for n in self.io.inputs if n not in self.inputs]
        if extra:
            raise GraphIntegrityError(
                f"{where} takes inputs sdtrt does not feed: {', '.join(extra)} (a {self.name} "
                f"graph takes {', '.join(self.inputs)}; SDXL-style UNets are not supported)"
            )
        for name in self.inputs:
            if self.io.inputs[name][0] not in TORCH_DTYPES:
                raise GraphIntegrityError(
                    f"{where}: input {name} is {self.io.inputs[name][0]}; sdtrt feeds "
                    f"{', '.join(TORCH_DTYPES)}"
                )

    def feeds(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs in the dtypes the graph takes (shapes as the contract says)."""
        return {name: tensor.to(self.input_dtype(name, "fp32")) for name, tensor in tensors.items()}

    @property
    def inputs(self) -> dict[str, list[int | Axis]]:
        raise NotImplementedError

    @property
    def outputs(self) -> dict[str, list[int | Axis]]:
        raise NotImplementedError

    def input_dtype(self, name: str, precision: str) -> torch.dtype:
        """The dtype of input ``name``: the graph's where it was read, else sdtrt's rule
        for an export at ``precision``."""
        if self.io is not None:
            return TORCH_DTYPES[self.io.inputs[name][0]]
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
        return self.shapes(batch, height, width)[self.output_name]

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
                out[name] = torch.randint(0, 400, shapes[name], generator=generator).to(
                    self.input_dtype(name, precision)
                )
            elif name == "timestep":
                out[name] = torch.full(shapes[name], 500.0, dtype=torch.float32)
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
        # int32 in sdtrt's graphs (what TensorRT binds natively); optimum's take int64.
        return super().input_dtype(name, precision) if self.io is not None else torch.int32

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
            "timestep": self._timestep_axes(),
            "encoder_hidden_states": [("2B", 1), self.dims.max_tokens, self.dims.text_hidden_size],
        }

    def _timestep_axes(self) -> list[int | Axis]:
        """sdtrt exports one timestep per row (the server batches requests at different
        steps in one call); optimum's graphs take a scalar, older ones ``[1]``."""
        if self.io is None or "timestep" not in self.io.inputs:
            return [("2B", 1)]
        shape = self.io.inputs["timestep"][1]
        return [] if shape == () else [1] if shape == (1,) else [("2B", 1)]

    @property
    def per_row_timesteps(self) -> bool:
        """Whether one call can run rows at different timesteps."""
        return self._timestep_axes() == [("2B", 1)]

    def feeds(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """``timestep`` (a scalar, or one per row) shaped as this graph takes it."""
        feeds = super().feeds(**tensors)
        timestep, rows = feeds["timestep"].reshape(-1), feeds["sample"].shape[0]
        if self.per_row_timesteps:
            if timestep.numel() not in (1, rows):
                raise InvalidInputError(
                    f"{timestep.numel()} timesteps for {rows} UNet rows: give one, or one per row"
                )
            feeds["timestep"] = timestep.expand(rows).contiguous()
        elif timestep.numel() > 1 and bool((timestep != timestep[0]).any()):
            raise InvalidInputError(
                "this UNet graph takes one timestep for all rows; rows at different steps "
                "need a graph exported by sdtrt (one timestep per row)"
            )
        else:
            feeds["timestep"] = timestep[:1] if self._timestep_axes() == [1] else timestep[0]
        return feeds

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
        u, c = self.dims.unet_factor, self.dims.latent_channels
        if not self.dims.vae_samples:
            return {"latents": [("B", 1), c, ("h", u), ("w", u)]}
        return {"latent_parameters": [("B", 1), 2 * c, ("h", u), ("w", u)]}

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


def networks_for(dims: ModelDims, io: dict[str, GraphIO] | None = None) -> dict[str, Network]:
    """The four contracts; ``io`` adapts those named to their graphs."""
    io = io or {}
    return {cls.name: cls(dims, io.get(cls.name)) for cls in NETWORKS}


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
    runtime samples with the caller's generator, so results stay reproducible. TAESD's
    encoder (no ``quant_conv``) gives the latents themselves."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class _VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]
