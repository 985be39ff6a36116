"""The PyTorch backend: diffusers / transformers modules called as diffusers' pipeline calls
them. It is the accuracy reference every other backend is compared with."""

from __future__ import annotations

from typing import Any

import torch


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        components: dict[str, Any],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_encoder = _moved(components["text_encoder"], self.device, dtype)
        self.unet_model = _moved(components["unet"], self.device, dtype)
        self.vae = _moved(components["vae"], self.device, dtype)
        # diffusers' UNet forwards odd sizes to its upsamplers, so only the VAE's 8 binds.
        self.size_multiple = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids.to(self.device))[0]
        return out.float()

    @torch.no_grad()
    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        out = self.unet_model(
            sample.to(self.dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image.to(self.dtype)).latent_dist.parameters.float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0].float()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _moved(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move only when needed: diffusers warns on every ``.to(dtype)`` call."""
    parameter = next(module.parameters())
    if parameter.device != device or parameter.dtype != dtype:
        module = module.to(device=device, dtype=dtype)
    return module
