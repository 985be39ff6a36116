"""A1111's prompt emphasis (runtime/emphasis.py): the parser against the examples A1111's
own parser documents, token ids and weights against the plain tokenization, the weighting
rule, and what A1111's API answers with it."""

from __future__ import annotations

import pytest
import torch

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.emphasis import emphasised, parse_emphasis, weighted_ids
from sdtrt.runtime.steps import token_ids


@pytest.mark.parametrize(
    ("text", "pieces"),
    [  # A1111's parse_prompt_attention's docstring, modules/prompt_parser.py
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),  # fmt: skip
        ("", [("", 1.0)]),
        ("a (cat:x) b) c]", [("a ", 1.0), ("cat:x", 1.1), (" b) c]", 1.0)]),
    ],
)
def test_the_parser_reads_a1111s_examples_as_a1111_does(text, pieces):
    assert parse_emphasis(text) == pieces


def test_break_is_refused():
    with pytest.raises(InvalidInputError, match="BREAK starts another 75-token chunk"):
        parse_emphasis("a cat BREAK a dog")
    assert parse_emphasis("BREAKFAST") == [("BREAKFAST", 1.0)]


@pytest.mark.parametrize(
    "prompt",
    ["a red circle on a blue background", "", "a photo, 4k, (detailed)", "word " * 100],
)
def test_ids_are_the_plain_texts(tiny, prompt):
    """The ids of a prompt with its emphasis taken out are token_ids' for that text (start,
    tokens, end, padding; a long one cut as token_ids cuts it)."""
    plain = prompt.replace("(", "").replace(")", "")
    ids, weights = weighted_ids(tiny["tokenizer"], [prompt])
    assert torch.equal(ids, token_ids(tiny["tokenizer"], [plain]))
    assert weights.shape == ids.shape
    assert set(weights.flatten().tolist()) <= {1.0, torch.tensor(1.1).item()}  # float32


def test_each_token_weighs_its_pieces(tiny):
    tokenizer = tiny["tokenizer"]
    ids, weights = weighted_ids(tokenizer, ["a (red:1.5) [circle]"])
    assert torch.equal(ids, token_ids(tokenizer, ["a red circle"]))
    red = tokenizer("red", add_special_tokens=False).input_ids
    at = ids[0].tolist().index(red[0])
    assert weights[0, at] == 1.5 and weights[0, at - 1] == 1.0
    assert weights[0, at + 1] == pytest.approx(1 / 1.1) and weights[0, 0] == 1.0


def test_the_weighting_keeps_each_prompts_mean():
    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2, 77)
    assert torch.equal(emphasised(hidden, ones), hidden)  # nothing weighed, nothing changed
    weights = ones.clone()
    weights[1, 3] = 1.5
    out = emphasised(hidden, weights)
    assert torch.equal(out[0], hidden[0])
    assert out[1].mean() == pytest.approx(hidden[1].mean().item(), rel=1e-5)
    ratio = out[1] / hidden[1]  # one factor for every row but the weighed one's, 1.5 more there
    factor = ratio[0, 0]
    torch.testing.assert_close(ratio[3], torch.full((8,), 1.5 * factor.item()))
    torch.testing.assert_close(ratio[[0, 1, 2, 4]], torch.full((4, 8), factor.item()))


def test_the_server_tokenizes_each_text_as_it_reads_it(tiny, caplog):
    """The batcher's text encoding of plain and emphasised prompts side by side: a plain
    prompt's row is its plain encoding; an emphasised one whose markup alone would pass 77
    tokens is not said to be cut (its text is 20 tokens)."""
    from sdtrt.runtime.pipeline import Img2ImgPipeline
    from sdtrt.serve.batcher import StepBatcher

    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    batcher = StepBatcher(pipe, start=False)
    marked = "(word:1.1) " * 20
    with caplog.at_level("WARNING"), torch.inference_mode():
        hidden = batcher._encode_texts([("a (red) circle", False), (marked, True)])
        plain = pipe.backend.encode_text(token_ids(tiny["tokenizer"], ["a (red) circle"]))
        ids, weights = weighted_ids(tiny["tokenizer"], [marked])
        weighed = emphasised(pipe.backend.encode_text(ids), weights)
    batcher.close()
    assert "truncated" not in caplog.text
    torch.testing.assert_close(hidden[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[1], weighed[0], rtol=0, atol=1e-6)
