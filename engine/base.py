"""The one interface the img2img loop talks to. A backend runs the four networks; it knows
nothing of schedulers, guidance or images, and the loop knows nothing of the backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

UnetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A UNet call: (sample, timestep, encoder_hidden_states) -> model output."""


class Backend(Protocol):
    """Runs text encoder, UNet, VAE encoder and VAE decoder.

    Inputs and outputs are float32 torch tensors on ``device`` (token ids are int64); a
    backend casts to its networks' precision inside, so the scheduler math stays in fp32.
    """

    name: str
    device: torch.device
    # Height and width (pixels) must be multiples of this.
    size_multiple: int
    # Whether one UNet call may run rows at different timesteps (graphs sdtrt exports do;
    # optimum's take one timestep for all rows).
    per_row_timesteps: bool
    # The most UNet rows one call takes (a TensorRT engine's profile); None: no bound.
    max_unet_rows: int | None
    # The most prompts or images one text encoder or VAE call takes (the smallest of those
    # engines' profiles); None: no bound.
    max_image_rows: int | None
    # ((lowest, highest) height, (lowest, highest) width) in pixels that the networks take
    # (TensorRT engines' profiles); None: any multiple of size_multiple.
    pixel_range: tuple[tuple[int, int], tuple[int, int]] | None
    # A UNet call (same arguments as ``unet``) that the pipeline may capture whole
    # denoising steps around as CUDA graphs; None: steps run eagerly.
    step_unet: UnetCall | None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, 77] token ids -> [B, 77, C] last hidden state."""
        ...

    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """[N, 4, h, w] latents, a timestep (scalar) or one per row ([N]), [N, 77, C] ->
        [N, 4, h, w] model output."""
        ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 8, h, w] latent distribution (mean, logvar)."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w] unscaled latents -> [B, 3, H, W] image in about [-1, 1]."""
        ...

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU); called before each clock read."""
        ...
