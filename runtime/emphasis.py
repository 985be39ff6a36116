"""A1111's prompt emphasis: ``(word)`` weighs a piece of the prompt 1.1 times, ``[word]``
1/1.1 times, ``(word:1.5)`` 1.5 times, nested brackets multiply, ``\\(`` is a bracket as
text. The prompt is tokenized piece by piece, each token keeping its piece's weight; the
text encoder's output rows are multiplied by their tokens' weights, then the whole scaled
back to the mean it had (the A1111 web UI's way, what its API's prompts are written for).

sdtrt's graphs take CLIP's 77 tokens: a prompt runs to 75 tokens and is cut there (A1111
chains 75-token chunks, and ``BREAK`` starts one: refused here)."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.steps import multi_vector_tokens

logger = logging.getLogger(__name__)

_PIECES = re.compile(
    r"""
    \\[()\[\]\\]      # an escaped bracket or backslash: text
    | \\              # a lone backslash
    | [(\[]           # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # a weight, closing its round bracket
    | [)\]]           # a closing bracket
    | [^\\()\[\]:]+   # text
    | :               # a colon that is not a weight's
    """,
    re.X,
)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces and their weights, neighbours of one weight joined; an unclosed
    bracket weighs from where it opens to the end; ``(word:X)`` whose X is no number, or a
    closing bracket none opened, is text."""
    if re.search(r"\bBREAK\b", text):
        raise InvalidInputError(
            "BREAK starts another 75-token chunk of the prompt, which sdtrt's 77-token text "
            "encoder cannot take: leave it out"
        )
    pieces: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PIECES.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            pieces.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(pieces))
        elif piece == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            weigh(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            weigh(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            weigh(squares.pop(), SQUARE)
        else:
            pieces.append([piece, 1.0])
    for start in rounds:
        weigh(start, ROUND)
    for start in squares:
        weigh(start, SQUARE)
    joined: list[tuple[str, float]] = []
    for piece, weight in pieces or [["", 1.0]]:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + piece, weight)
        else:
            joined.append((piece, weight))
    return joined


def weighted_ids(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 77] token ids of the prompts' text without its emphasis, as ``token_ids`` gives
    them for that text (start, tokens, end, padding; a textual inversion token of several
    vectors followed by its others), and [N, 77] weights: each token its piece's, 1 for the
    start, end and padding."""
    size = tokenizer.model_max_length
    vectors = multi_vector_tokens(tokenizer)
    rows, weights, cut = [], [], False
    for prompt in prompts:
        ids: list[int] = []
        multipliers: list[float] = []
        for piece, weight in parse_emphasis(prompt):
            tokens = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
            tokens = [i for token in tokens for i in (token, *vectors.get(token, ()))]
            ids += tokens
            multipliers += [weight] * len(tokens)
        if len(ids) > size - 2:
            ids, multipliers, cut = ids[: size - 2], multipliers[: size - 2], True
        padding = size - 2 - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                    + [tokenizer.pad_token_id] * padding)  # fmt: skip
        weights.append([1.0, *multipliers, 1.0] + [1.0] * padding)
    if cut:
        logger.warning(
            "a prompt is longer than the text encoder's %d tokens and was truncated", size
        )
    return torch.tensor(rows), torch.tensor(weights)


def emphasised(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The text encoder's [N, 77, D] output with each token's row multiplied by its weight,
    then each prompt's scaled back to the mean it had (A1111's rule)."""
    weights = weights.to(hidden.device, hidden.dtype)
    mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights[..., None]
    return weighted * (mean / weighted.mean(dim=(1, 2), keepdim=True))
