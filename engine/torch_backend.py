"""The PyTorch backend: diffusers / transformers modules called as diffusers' pipeline calls
them. It is the accuracy reference every other backend is compared with."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch._dynamo

from sdtrt.engine.base import UnetCall
from sdtrt.engine.cuda_graphs import CudaGraphed
from sdtrt.engine.factory import check_available
from sdtrt.errors import InvalidInputError
from sdtrt.export.networks import ModelDims
from sdtrt.models import quiet_loaders
from sdtrt.options import DTYPES, TorchOptions

# What ``compile_unet`` compiles with: inductor, in its default mode (no CUDA graphs of its
# own, no autotuning: max-autotune did not finish SD-1.5's UNet in 5 minutes on an H100).
# Tests swap in a backend that compiles in seconds on a CPU.
COMPILE_BACKEND = "inductor"
# The UNet is compiled for each input shape (dynamic=False: kernels specialised to it), and
# dynamo compiles one function for 8 shapes at most (its recompile_limit): with fullgraph
# the 9th raised FailOnRecompileLimitHit, and a server forms up to --max-rows row counts
# per image size. Up to this many UNet shapes per process are compiled; others run eager.
COMPILED_SHAPES = 64
# The switches that change the UNet module itself, in place as diffusers' own calls do
# (--compile wraps it instead): whoever shares the module and wants it unchanged copies it.
IN_PLACE_SWITCHES = ("channels_last", "fuse_qkv")

logger = logging.getLogger(__name__)


class TorchBackend:
    name = "torch"
    per_row_timesteps = True  # diffusers' UNet takes a timestep per row
    max_unet_rows: int | None = None
    max_image_rows: int | None = None
    pixel_range: tuple[tuple[int, int], tuple[int, int]] | None = None

    def __init__(self, components: dict[str, Any], options: TorchOptions = TorchOptions()) -> None:
        check_available(options)
        self.device = torch.device(options.device)
        self.dtype = dtype = getattr(torch, DTYPES[options.dtype])
        if self.device.type == "cpu" and dtype == torch.float16:
            # Measured on 2 cores, the tiny model at 512x512: 6 s per UNet call against 0.24.
            logger.warning(
                "fp16 on the CPU runs many times slower than fp32 (PyTorch's CPU kernels are "
                "fp32's): use it to check fp16 numbers, fp32 for speed"
            )
        self.text_encoder = _moved(components["text_encoder"], self.device, dtype)
        self.unet_model = _moved(components["unet"], self.device, dtype)
        self.unet_call = self._tuned(self.unet_model, options)
        """The UNet module as the options tune it (compiled where asked): every UNet call,
        eager, graphed or inside a step graph, goes through it (the bench wraps it)."""
        self._warned_eager = False
        self.vae = _moved(components["vae"], self.device, dtype)
        dims = ModelDims.from_components(components)
        # diffusers' UNet forwards odd sizes to its upsamplers, so only the VAE's 8 binds.
        self.size_multiple = dims.vae_scale_factor
        self._vae_samples = dims.vae_samples
        graphs = options.cuda_graphs or options.step_graphs  # steps not tabulated: the UNet's
        self._graphed_unet = CudaGraphed(self._unet_forward) if graphs else None
        # What the pipeline captures whole steps around (runtime/step_graph.py).
        self.step_unet: UnetCall | None = self._unet_eager if options.step_graphs else None

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids.to(self.device))[0]
        return out.float()

    def _unet_forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        try:
            out = self.unet_call(sample, timestep, encoder_hidden_states=hidden, return_dict=False)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self._warned_eager:
                self._warned_eager = True
                logger.warning(
                    "the UNet is compiled for %d input shapes, the most per process: this "
                    "shape (%s) and later new ones run eager",
                    COMPILED_SHAPES,
                    "x".join(map(str, sample.shape)),
                )
            out = self.unet_model(sample, timestep, encoder_hidden_states=hidden, return_dict=False)
        return out[0]

    @staticmethod
    def _tuned(unet: Any, options: TorchOptions) -> Any:
        """The UNet module as ``options`` asks it to run: in place, as diffusers' calls are."""
        if options.channels_last:
            unet.to(memory_format=torch.channels_last)
        if options.fuse_qkv:
            try:
                unet.fuse_qkv_projections()
            except ValueError as exc:  # diffusers refuses UNets with added KV projections
                raise InvalidInputError(f"--fuse-qkv does not apply to this UNet: {exc}") from None
        if options.compile_unet:
            # Raised for the process (a limit, not a setting of our own compiled function).
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, COMPILED_SHAPES)
            return torch.compile(unet, backend=COMPILE_BACKEND, fullgraph=True, dynamic=False)
        return unet

    @torch.inference_mode()
    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        if self._graphed_unet is not None:
            args = (sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype))
            return self._graphed_unet(*args).float()
        return self._unet_eager(sample, timestep, encoder_hidden_states)

    def _unet_eager(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        return self._unet_forward(sample.to(self.dtype), timestep, hidden.to(self.dtype)).float()

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(image.to(self.dtype))
        if self._vae_samples:  # AutoencoderKL: the distribution, sampled later
            return encoded.latent_dist.parameters.float()
        return encoded.latents.float()  # TAESD's AutoencoderTiny: the latents

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0].float()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _moved(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move only when needed: diffusers warns on every ``.to(dtype)`` call. The move is in
    place, as diffusers' ``pipeline.to()`` is: components shared with another pipeline move
    too (copy them first to keep both)."""
    parameter = next(module.parameters())
    if parameter.device != device or parameter.dtype != dtype:
        with quiet_loaders():  # "modules that should be kept in float32: []": none are
            module = module.to(device=device, dtype=dtype)
    return module
