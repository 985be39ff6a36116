"""A CLIP byte-level BPE tokenizer whose vocabulary and merges are built in code.

The embedded tiny model must run with no hub access, so its tokenizer cannot come from a
checkpoint. CLIP's vocabulary is built the same way here as OpenAI builds it (the 256 byte
symbols, the same with the end-of-word marker, one entry per merge, then the two special
tokens); only the merge list is ours: a few hundred merges learnt from a fixed word list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from transformers import CLIPTokenizer

# Words the merges are learnt from: the seed's prompt and common English prompt words.
_CORPUS = (
    "a colorful dancer nat geo photo of the an and in on with by at portrait landscape "
    "painting photograph cat dog house tree mountain river city street night day light "
    "red green blue yellow orange purple black white golden sunset sunrise forest ocean "
    "beautiful detailed high quality realistic digital art style oil watercolor sketch "
    "woman man child person face eyes hair dress flower garden sky cloud water fire "
    "snow rain winter summer spring autumn old new small large bright dark colourful "
    "dancing dancers photography national geographic cinematic studio lighting "
    # the trained tiny model's captions (train/shapes.py), twice: each word one token
    + ("circle square triangle background top bottom left right middle " * 2)
).split()
_NUM_MERGES = 300


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable-unicode table.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent adjacent pair first, ties broken by the pair)."""
    split = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs = Counter(p for symbols in split for p in pairwise(symbols))
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        for symbols in split:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [merged]
                i += 1
    return merges


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(_CORPUS, _NUM_MERGES)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tiny_tokenizer() -> CLIPTokenizer:
    vocab, merges = build_vocab_and_merges()
    # transformers 5 takes merges as (a, b) pairs, whatever its annotation says (strings).
    pairs: Any = merges
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
