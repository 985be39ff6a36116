"""Run by the optimum venv (optimum-onnx needs transformers < 4.58, so it lives apart):
optimum's ORTStableDiffusionImg2ImgPipeline on an exported folder, the result as .npy.

    python optimum_img2img.py FOLDER IMAGE SCHEDULER OUT.npy
"""

import sys

import diffusers
import numpy as np
import PIL.Image
import torch
from optimum.onnxruntime import ORTStableDiffusionImg2ImgPipeline
from settings import CALL, PROMPT, SEED  # beside this script

folder, image, scheduler, out = sys.argv[1:]
pipe = ORTStableDiffusionImg2ImgPipeline.from_pretrained(folder)
pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
result = pipe(
    PROMPT,
    PIL.Image.open(image).convert("RGB"),
    generator=torch.Generator().manual_seed(SEED),
    **CALL,
)
np.save(out, np.asarray(result.images, dtype=np.float32))
print(
    type(pipe.vae_decoder).__name__, pipe.vae_scale_factor, pipe.vae_decoder.config.scaling_factor
)
