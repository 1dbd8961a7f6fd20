"""Fill-in-the-middle (FIM): the special tokens that put a document's suffix before its middle.

Under block-causal attention a span sees only what precedes it, so infilling reorders the document as
prefix, suffix, middle (the middle is generated last and ends with EOS). A checkpoint without FIM tokens
gets ours, added like the mask token (mean-row init), and learns them from FIM-transformed CPT data.

Pure functions, shared by the data build (the transform) and infilling (the prompt):
`find_fim_tokens` recognises a tokenizer's FIM tokens under the common spellings, `ensure_fim_tokens` adds ours
when it has none, `fim_split` cuts a document at two uniform character positions, `fim_ids` lays the pieces out in
PSM order and `split_fim_ids` reads them back.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

# Our names, in prompt order: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle EOS.
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)

# (prefix, suffix, middle) as spelled by common code tokenizers; the first one a tokenizer has wins.
FIM_SPELLINGS: tuple[tuple[str, str, str], ...] = (
    FIM_TOKENS,  # ours; Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"),  # Seed-Coder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder (full-width bars)
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),  # the same with ASCII bars
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # Code Llama
)


@dataclass(frozen=True)
class FimTokens:
    """A tokenizer's three FIM tokens: names and ids."""

    prefix: str
    suffix: str
    middle: str
    prefix_id: int
    suffix_id: int
    middle_id: int

    @property
    def names(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle

    @property
    def ids(self) -> tuple[int, int, int]:
        return self.prefix_id, self.suffix_id, self.middle_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FimTokens:
        return cls(**{k: d[k] for k in ("prefix", "suffix", "middle", "prefix_id", "suffix_id", "middle_id")})


def find_fim_tokens(tokenizer) -> FimTokens | None:
    """The tokenizer's FIM tokens under any spelling of `FIM_SPELLINGS` (all three must exist), else None."""
    vocab = tokenizer.get_vocab()
    for names in FIM_SPELLINGS:
        if all(n in vocab for n in names):
            return FimTokens(*names, *(int(vocab[n]) for n in names))
    return None


def ensure_fim_tokens(tokenizer) -> tuple[FimTokens, bool]:
    """(the tokenizer's FIM tokens, whether they were added). A tokenizer without any gets ours as additional
    special tokens, appended in `FIM_TOKENS` order — the ids `convert.add_special_tokens` gives the model."""
    found = find_fim_tokens(tokenizer)
    if found is not None:
        return found, False
    tokenizer.add_tokens(list(FIM_TOKENS), special_tokens=True)
    found = find_fim_tokens(tokenizer)
    assert found is not None
    return found, True


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """(prefix, middle, suffix) cut at two character positions drawn uniformly from 0..len(text), sorted.
    prefix + middle + suffix == text; any piece may be empty."""
    a, b = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:a], text[a:b], text[b:]


def fim_ids(prefix: list[int], middle: list[int], suffix: list[int], fim: FimTokens) -> list[int]:
    """PSM order: <prefix tok> prefix <suffix tok> suffix <middle tok> middle (the caller appends EOS)."""
    return [fim.prefix_id, *prefix, fim.suffix_id, *suffix, fim.middle_id, *middle]


def fim_prompt_ids(prefix: list[int], suffix: list[int], fim: FimTokens) -> list[int]:
    """An infilling prompt: everything of `fim_ids` before the middle."""
    return [fim.prefix_id, *prefix, fim.suffix_id, *suffix, fim.middle_id]


def split_fim_ids(ids: list[int], fim: FimTokens) -> tuple[list[int], list[int], list[int]]:
    """(prefix, middle, suffix) of a `fim_ids` sequence (the inverse of `fim_ids`)."""
    if len(ids) < 3 or ids[0] != fim.prefix_id or fim.suffix_id not in ids or fim.middle_id not in ids:
        raise ValueError("not a PSM fill-in-the-middle sequence (expected prefix, suffix and middle tokens)")
    s, m = ids.index(fim.suffix_id), ids.index(fim.middle_id)
    if not 0 < s < m:
        raise ValueError("FIM tokens out of order: expected prefix, suffix, middle")
    return ids[1:s], ids[m + 1:], ids[s + 1:m]


__all__ = ["FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_TOKENS", "FIM_SPELLINGS", "FimTokens", "find_fim_tokens",
           "ensure_fim_tokens", "fim_split", "fim_ids", "fim_prompt_ids", "split_fim_ids"]
