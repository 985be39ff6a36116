"""A call's prompts and negative prompts, by diffusers' rules: strings, or embeddings in their
place."""

from __future__ import annotations

from typing import Any

import torch

from sdtrt.errors import InvalidInputError

Texts = list[str] | torch.Tensor
"""Prompts as strings, or as their embeddings [prompts, tokens, width]."""


def call_texts(
    prompt: Any,
    negative_prompt: Any,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    *,
    text_shape: tuple[int, int],
    device: torch.device,
) -> tuple[Texts, Texts]:
    """The prompts and negative prompts, as strings or as embeddings (diffusers' rules:
    ``prompt`` or ``prompt_embeds``; at most one of the negative pair; negative prompts
    one per prompt, or one string for all; none: empty strings). Embeddings must have
    ``text_shape`` (tokens, width) per prompt; they are given back on ``device``."""
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidInputError("give prompt or prompt_embeds, one of the two")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InvalidInputError("give negative_prompt or negative_prompt_embeds, not both")
    prompts: Texts
    if prompt_embeds is None:
        prompts = prompt_list(prompt, "prompt")
    else:
        prompts = embeddings(prompt_embeds, "prompt_embeds", text_shape, device)
    if negative_prompt_embeds is not None:
        negatives = embeddings(negative_prompt_embeds, "negative_prompt_embeds", text_shape, device)
        if len(negatives) != len(prompts):
            raise InvalidInputError(
                f"negative_prompt_embeds holds {len(negatives)} prompts, the prompts are "
                f"{len(prompts)}: give one per prompt"
            )
        return prompts, negatives
    return prompts, negatives_for(len(prompts), negative_prompt)


def embeddings(
    embeds: Any, name: str, text_shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Prompt embeddings given in place of prompts: the text encoder's output shape
    (every backend's UNet takes that sequence length), finite, as float32 on the device."""
    want = f"[prompts, {text_shape[0]}, {text_shape[1]}]"
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        what = type(embeds).__name__
        if isinstance(embeds, torch.Tensor):
            what = f"a tensor of {embeds.dtype}"
        raise InvalidInputError(f"{name} must be a float tensor {want}, got {what}")
    if embeds.ndim != 3 or not len(embeds) or tuple(embeds.shape[1:]) != text_shape:
        raise InvalidInputError(
            f"{name} has shape {list(embeds.shape)}; expected {want}, the text encoder's "
            "output for this model"
        )
    if not torch.isfinite(embeds).all():
        raise InvalidInputError(f"{name} holds NaN or infinite values")
    return embeds.to(device, torch.float32)


def prompt_list(prompt: Any, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidInputError(f"{what} must be a string or a non-empty list of strings")


def prompt_lists(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
    """The prompts and their negative prompts as lists, by diffusers' rules: a string or a
    non-empty list of them; negative prompts one for all, or one per prompt; none: empty
    strings. The pipeline's call and the server's requests take them so."""
    prompts = prompt_list(prompt, "prompt")
    return prompts, negatives_for(len(prompts), negative_prompt)


def negatives_for(count: int, negative_prompt: Any) -> list[str]:
    """``count`` prompts' negative prompts (``prompt_lists`` says the rules)."""
    if negative_prompt is None:
        return [""] * count
    negative_prompts = prompt_list(negative_prompt, "negative prompt")
    if len(negative_prompts) == 1:
        negative_prompts = negative_prompts * count
    if len(negative_prompts) != count:
        raise InvalidInputError(
            f"{len(negative_prompts)} negative prompts for {count} prompts: "
            "give one, or one per prompt"
        )
    return negative_prompts
