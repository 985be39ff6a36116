"""A stream's previews (``preview_every``, OpenAI's ``partial_images``): each previewing job's
estimate of its finished latents (the scheduler's x0) decoded by the model's VAE, or by a
TAESD (``ServeOptions.preview_vae``), then rounded to 8-bit pixels on the device as
diffusers' ``numpy_to_pil`` rounds them on the host (the same pictures), ready to be copied
to the host without waiting for the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import PIL.Image
import torch

from sdtrt.runtime.pipeline import Img2ImgPipeline


class PreviewDecoder:
    """Decodes previews for one pipeline's jobs, with its VAE or the TAESD at ``path``."""

    def __init__(
        self,
        pipeline: Img2ImgPipeline,
        path: str | None,
        decode: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """``decode``: how the model's VAE decodes a batch (the batcher's, in chunks its
        engines take)."""
        self.pipeline = pipeline
        self.decode = decode
        self.taesd: Any = None
        """The TAESD that decodes previews; None: the model's VAE does."""
        if path is not None:
            from sdtrt.adapters import load_preview_vae
            from sdtrt.models import quiet_loaders

            dims, device = pipeline.dims, pipeline.backend.device
            vae = load_preview_vae(path, dims.latent_channels, dims.vae_scale_factor)
            half = device.type == "cuda"  # TAESD runs in fp16 on GPUs (web UIs' way)
            with quiet_loaders():  # diffusers' note on casting, with no module to keep fp32
                self.taesd = vae.to(device, torch.float16 if half else torch.float32)

    def pixels(self, estimates: torch.Tensor) -> torch.Tensor:
        """The pictures of ``estimates`` (x0 latents, on the device) as 8-bit pixels, NHWC,
        on the device (queued there: nothing here waits for it)."""
        if self.taesd is None:
            decoded = self.decode(estimates / self.pipeline.scaling_factor)
        else:  # TAESD's latents are the scaled ones (its scaling factor: 1)
            vae = self.taesd
            latents = (estimates / vae.config.scaling_factor).to(vae.device, vae.dtype)
            decoded = vae.decode(latents, return_dict=False)[0].float()
        # diffusers' postprocessing to [0, 1], then numpy_to_pil's rounding in fp32.
        images = self.pipeline.image_processor.postprocess(decoded, output_type="pt").float()
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def pictures(pixels: torch.Tensor) -> list[PIL.Image.Image]:
    """8-bit NHWC pixels on the host as pictures."""
    return [PIL.Image.fromarray(image) for image in pixels.numpy()]
