"""Test helper: diffusers components written as one checkpoint in the original Stable
Diffusion (LDM) layout, the inverse of diffusers' single-file conversion, for SD 1.x
networks with two resnets per UNet down block (the tiny model and SD 1.5 both)."""

from __future__ import annotations

import re
from typing import Any

import torch

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "mid_block.attentions.0.": "middle_block.1.",
}
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_key(key: str, up_with_attention: set[int]) -> str:
    for hf, sd in _UNET_FIXED.items():
        if key.startswith(hf):
            return sd + key[len(hf) :]
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"input_blocks.{3*i+j+1}.0.", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"input_blocks.{3*i+j+1}.1.", 0),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda i: f"input_blocks.{3*(i+1)}.0.op.", 0),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"output_blocks.{3*i+j}.0.", True),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"output_blocks.{3*i+j}.1.", 0),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda i: f"output_blocks.{3*i+2}.{2 if i in up_with_attention else 1}.",
            0,
        ),
        (r"mid_block\.resnets\.(\d+)\.", lambda j: f"middle_block.{2*j}.", True),
    ]  # fmt: skip
    for pattern, prefix, is_resnet in rules:
        match = re.match(pattern, key)
        if match:
            rest = key[match.end() :]
            if is_resnet:
                for hf, sd in _RESNET.items():
                    if rest.startswith(hf):
                        rest = sd + rest[len(hf) :]
            return prefix(*(int(g) for g in match.groups())) + rest
    raise KeyError(f"no LDM name for UNet key {key}")


def _vae_key(key: str, num_up: int) -> str:
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda i, j: f"encoder.down.{i}.block.{j}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
         lambda i: f"encoder.down.{i}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda i, j: f"decoder.up.{num_up - 1 - i}.block.{j}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda i: f"decoder.up.{num_up - 1 - i}.upsample."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", None),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", None),
    ]  # fmt: skip
    for pattern, prefix in rules:
        match = re.match(pattern, key)
        if not match:
            continue
        rest = key[match.end() :]
        if prefix is not None:
            head = prefix(*(int(g) for g in match.groups()))
        elif "resnets" in pattern:
            head = f"{match[1]}.mid.block_{int(match[2]) + 1}."
        else:
            head = f"{match[1]}.mid.attn_1."
            for hf, sd in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
                           ("to_v.", "v."), ("to_out.0.", "proj_out.")):  # fmt: skip
                if rest.startswith(hf):
                    rest = sd + rest[len(hf) :]
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        return head + rest
    return key.replace("conv_norm_out.", "norm_out.")


def to_ldm_checkpoint(components: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One state dict in the original layout: model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.text_model.*."""
    unet = components["unet"].state_dict()
    up_with_attention = {
        int(k.split(".")[1]) for k in unet if re.match(r"up_blocks\.\d+\.attentions", k)
    }
    out = {f"model.diffusion_model.{_unet_key(k, up_with_attention)}": v for k, v in unet.items()}
    vae = components["vae"].state_dict()
    num_up = len(components["vae"].config.up_block_types)
    for key, value in vae.items():
        new = _vae_key(key, num_up)
        if ".mid.attn_1." in new and value.ndim == 2:  # LDM's attention is 1x1 convolutions
            value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    for key, value in components["text_encoder"].state_dict().items():
        out[f"cond_stage_model.transformer.text_model.{key}"] = value
    return {k: v.contiguous() for k, v in out.items()}
