"""Fill-in-the-middle pure functions: recognising FIM tokens, the split, the PSM layout and its inverse."""

from __future__ import annotations

import math
import random

import pytest

from diffcoder.fim import (
    FIM_SPELLINGS,
    FIM_TOKENS,
    FimTokens,
    ensure_fim_tokens,
    fim_ids,
    fim_prompt_ids,
    fim_split,
    find_fim_tokens,
    split_fim_ids,
)
from diffcoder.testing import tiny_model, tiny_tokenizer

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "",
    "x",
    "naïve = 'ünïcödé → ✓'\nprint(naïve)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
]


@pytest.mark.parametrize("spelling", FIM_SPELLINGS)
def test_recognises_common_spellings(spelling):
    tok = tiny_tokenizer()
    n = len(tok)
    tok.add_tokens(list(spelling), special_tokens=True)
    fim = find_fim_tokens(tok)
    assert fim is not None and fim.names == spelling and fim.ids == (n, n + 1, n + 2)
    assert ensure_fim_tokens(tok) == (fim, False)  # nothing added when the tokenizer has them


def test_no_or_partial_fim_tokens_are_not_recognised():
    tok = tiny_tokenizer()
    assert find_fim_tokens(tok) is None
    tok.add_tokens(["<fim_prefix>", "<fim_suffix>"], special_tokens=True)  # no middle token
    assert find_fim_tokens(tok) is None


def test_ensure_adds_ours_with_the_ids_the_model_gets():
    from diffcoder.convert import add_special_tokens

    data_tok = tiny_tokenizer()
    fim, added = ensure_fim_tokens(data_tok)
    assert added and fim.names == FIM_TOKENS and fim.ids == (384, 385, 386)
    model, model_tok = tiny_model(), tiny_tokenizer()
    assert add_special_tokens(model, model_tok, FIM_TOKENS) == list(fim.ids)
    assert model.config.vocab_size == 387


def test_split_reconstructs_the_document():
    rng = random.Random(0)
    for text in DOCS * 50:
        prefix, middle, suffix = fim_split(text, rng)
        assert prefix + middle + suffix == text


def test_cut_points_are_uniform():
    """Two sorted uniform cuts: E[first]/len = 1/3, E[second]/len = 2/3, and every split position occurs."""
    rng = random.Random(1)
    text = "a" * 100
    firsts, seconds = [], []
    for _ in range(20000):
        p, m, _ = fim_split(text, rng)
        firsts.append(len(p) / 100)
        seconds.append((len(p) + len(m)) / 100)
    # standard deviation of the min/max of two uniforms is sqrt(1/18); the mean of 20000 is within 4 sigma
    bound = 4 * math.sqrt(1 / 18) / math.sqrt(20000)
    assert abs(sum(firsts) / len(firsts) - 1 / 3) < bound
    assert abs(sum(seconds) / len(seconds) - 2 / 3) < bound
    assert min(firsts) == 0 and max(seconds) == 1


def test_psm_layout_and_inverse():
    fim = ensure_fim_tokens(tiny_tokenizer())[0]
    ids = fim_ids([10, 11], [20], [30, 31, 32], fim)
    assert ids == [384, 10, 11, 385, 30, 31, 32, 386, 20]
    assert ids[: len(fim_prompt_ids([10, 11], [30, 31, 32], fim))] == fim_prompt_ids([10, 11], [30, 31, 32], fim)
    assert split_fim_ids(ids, fim) == ([10, 11], [20], [30, 31, 32])
    assert split_fim_ids(fim_ids([], [], [], fim), fim) == ([], [], [])
    with pytest.raises(ValueError, match="not a PSM"):
        split_fim_ids([10, 11], fim)
    with pytest.raises(ValueError, match="out of order"):
        split_fim_ids([384, 386, 385], fim)


def test_token_round_trip():
    """Pieces tokenized separately decode back to the document (byte-level BPE is lossless)."""
    from diffcoder.training.data import encode_text

    tok = tiny_tokenizer()
    fim = ensure_fim_tokens(tok)[0]
    rng = random.Random(2)
    for text in DOCS * 20:
        p, m, s = fim_split(text, rng)
        ids = fim_ids(encode_text(tok, p), encode_text(tok, m), encode_text(tok, s), fim)
        pi, mi, si = split_fim_ids(ids, fim)
        decoded = [tok.decode(x, clean_up_tokenization_spaces=False) for x in (pi, mi, si)]
        assert decoded == [p, m, s] and "".join(decoded) == text


def test_seed_coder_spelling_is_suffix_first_in_data_and_prompts():
    tok = tiny_tokenizer()
    tok.add_tokens(["<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"], special_tokens=True)
    fim = find_fim_tokens(tok)
    assert fim.order == "spm" and fim.ids == (384, 385, 386)
    ids = fim_ids([10, 11], [20], [30, 31, 32], fim)
    assert ids == [385, 30, 31, 32, 384, 10, 11, 386, 20]  # <suffix> suffix <prefix> prefix <middle> middle
    assert split_fim_ids(ids, fim) == ([10, 11], [20], [30, 31, 32])
    with pytest.raises(ValueError, match="not a SPM"):
        split_fim_ids([384, 10, 385, 386], fim)
    assert FimTokens.from_dict(fim.to_dict()) == fim
    # an index written before order/end_ids existed reads back as PSM
    old = {k: v for k, v in fim.to_dict().items() if k not in ("order", "end_ids")}
    assert FimTokens.from_dict(old).order == "psm"
