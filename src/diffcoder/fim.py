"""Fill-in-the-middle (FIM): the special tokens that put a document's suffix before its middle.

Under block-causal attention a span sees only what precedes it, so infilling reorders the document as
prefix, suffix, middle (the middle is generated last and ends with EOS). A checkpoint without FIM tokens
gets ours, added like the mask token (mean-row init), and learns them from FIM-transformed CPT data.

Pure functions, shared by the data build (the transform) and infilling (the prompt):
`find_fim_tokens` recognises a tokenizer's FIM tokens under the common spellings (with the piece order and the
end-of-middle tokens that spelling implies), `require_fim_tokens` says how to get them when there are none,
`ensure_fim_tokens` adds ours, `fim_split` cuts a document at two uniform character positions, `fim_ids` lays the
pieces out in the checkpoint's order and `split_fim_ids` reads them back, `infill_prompt_ids` builds an infilling
prompt from text.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from diffcoder.errors import DiffcoderError

# Our names, in prompt order: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle EOS.
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)

# (prefix, suffix, middle) as spelled by common code tokenizers; the first one a tokenizer has wins.
FIM_SPELLINGS: tuple[tuple[str, str, str], ...] = (
    FIM_TOKENS,  # ours; Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),  # SantaCoder
    ("<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"),  # Seed-Coder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder (full-width bars)
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),  # the same with ASCII bars
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # Code Llama
)
# Spellings whose checkpoints were trained suffix first (SPM: <suffix tok> suffix <prefix tok> prefix <middle tok>),
# keyed by their prefix token. Seed-Coder's published FIM format is SPM; the others are PSM.
SUFFIX_FIRST = frozenset({"<[fim-prefix]>"})
# Tokens besides EOS that end a middle in checkpoints of a spelling (padding, file separators, Code Llama's EOT),
# keyed by the prefix token; those the tokenizer has are stop tokens when infilling.
END_OF_MIDDLE: dict[str, tuple[str, ...]] = {
    FIM_PREFIX: ("<|fim_pad|>", "<|file_sep|>", "<|file_separator|>"),
    "<fim_prefix>": ("<fim_pad>", "<file_sep>"),
    "<fim-prefix>": ("<fim-pad>",),
    "<[fim-prefix]>": ("<[fim-pad]>",),
    "<｜fim▁begin｜>": ("<|EOT|>",),
    "<|fim▁begin|>": ("<|EOT|>",),
    "▁<PRE>": ("▁<EOT>",),
}


class NoFimTokensError(DiffcoderError):
    """Infilling asked of a checkpoint whose tokenizer has no fill-in-the-middle tokens."""


@dataclass(frozen=True)
class FimTokens:
    """A tokenizer's three FIM tokens (names and ids), the order its checkpoints put the pieces in ("psm" or
    "spm") and the tokens besides EOS that end a middle."""

    prefix: str
    suffix: str
    middle: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    order: str = "psm"
    end_ids: tuple[int, ...] = ()

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
        # order and end_ids are optional: data indexes written before they existed are PSM with no extra end
        names = {k: d[k] for k in ("prefix", "suffix", "middle", "prefix_id", "suffix_id", "middle_id")}
        return cls(**names, order=d.get("order", "psm"), end_ids=tuple(d.get("end_ids", ())))


def find_fim_tokens(tokenizer) -> FimTokens | None:
    """The tokenizer's FIM tokens under any spelling of `FIM_SPELLINGS` (all three must exist), else None."""
    vocab = tokenizer.get_vocab()
    for names in FIM_SPELLINGS:
        if all(n in vocab for n in names):
            ends = tuple(int(vocab[e]) for e in END_OF_MIDDLE.get(names[0], ()) if e in vocab)
            return FimTokens(*names, *(int(vocab[n]) for n in names),
                             order="spm" if names[0] in SUFFIX_FIRST else "psm", end_ids=ends)
    return None


def require_fim_tokens(tokenizer, name: str = "this checkpoint") -> FimTokens:
    """The tokenizer's FIM tokens, or a NoFimTokensError that names the fix (train with a FIM share)."""
    found = find_fim_tokens(tokenizer) if tokenizer is not None else None
    if found is None:
        raise NoFimTokensError(
            f"{name} has no fill-in-the-middle tokens ({'/'.join(FIM_TOKENS)}, or another known spelling such as "
            f"<fim_prefix>), so it cannot infill; give it some by training with a FIM share: `diffcoder data build "
            f"CORPUS --out DATA --tokenizer MODEL --fim-rate 0.5`, then `diffcoder train cpt model.path=MODEL "
            f"data.path=DATA`")
    return found


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
    """PSM: <prefix tok> prefix <suffix tok> suffix <middle tok> middle; SPM (fim.order "spm"): <suffix tok>
    suffix <prefix tok> prefix <middle tok> middle. The caller appends EOS."""
    return [*fim_prompt_ids(prefix, suffix, fim), *middle]


def fim_prompt_ids(prefix: list[int], suffix: list[int], fim: FimTokens) -> list[int]:
    """An infilling prompt: everything of `fim_ids` before the middle."""
    if fim.order == "spm":
        return [fim.suffix_id, *suffix, fim.prefix_id, *prefix, fim.middle_id]
    return [fim.prefix_id, *prefix, fim.suffix_id, *suffix, fim.middle_id]


def split_fim_ids(ids: list[int], fim: FimTokens) -> tuple[list[int], list[int], list[int]]:
    """(prefix, middle, suffix) of a `fim_ids` sequence (the inverse of `fim_ids`)."""
    spm = fim.order == "spm"
    first, second = (fim.suffix_id, fim.prefix_id) if spm else (fim.prefix_id, fim.suffix_id)
    layout = "SPM" if spm else "PSM"
    if len(ids) < 3 or ids[0] != first or second not in ids or fim.middle_id not in ids:
        raise ValueError(f"not a {layout} fill-in-the-middle sequence (expected prefix, suffix and middle tokens)")
    s, m = ids.index(second), ids.index(fim.middle_id)
    if not 0 < s < m:
        raise ValueError("FIM tokens out of order: expected " + ("suffix, prefix, middle" if spm else
                                                                  "prefix, suffix, middle"))
    a, b, middle = ids[1:s], ids[s + 1:m], ids[m + 1:]
    return (b, middle, a) if spm else (a, middle, b)


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of a piece of code, no special tokens added; text spelling a special token stays text (as in
    the data build), so a file that mentions `<|fim_prefix|>` cannot inject a control token."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The BOS a tokenizer puts before text by default ([] for most code tokenizers, ours included). Checkpoints
    whose tokenizers add one (DeepSeek-Coder, Code Llama) saw it before their FIM prompts too."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) == [bos] else []


def infill_prompt_ids(tokenizer, prefix: str | list[int], suffix: str | list[int],
                      fim: FimTokens | None = None) -> list[int]:
    """The infilling prompt of a prefix and a suffix (text, or token ids as they are) in the checkpoint's FIM
    layout, after its default BOS if it has one; the model generates the middle from here."""
    fim = fim or require_fim_tokens(tokenizer)
    ids = [encode_piece(tokenizer, x) if isinstance(x, str) else list(x) for x in (prefix, suffix)]
    return leading_special_ids(tokenizer) + fim_prompt_ids(ids[0], ids[1], fim)


__all__ = ["FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_TOKENS", "FIM_SPELLINGS", "SUFFIX_FIRST", "END_OF_MIDDLE",
           "FimTokens", "NoFimTokensError", "find_fim_tokens", "require_fim_tokens", "ensure_fim_tokens", "fim_split",
           "fim_ids", "fim_prompt_ids", "split_fim_ids", "encode_piece", "leading_special_ids", "infill_prompt_ids"]
