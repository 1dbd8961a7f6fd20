"""Chat templates, applied one way: the CLI's --chat, the server's /v1/chat/completions, SFT data and the
benchmarks' instruct prompts all turn messages into prompt ids with `chat_prompt_ids`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffcoder.errors import DiffcoderError


class NoChatTemplateError(DiffcoderError):
    """The tokenizer has no chat template to lay the messages out with."""


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def token_ids(encoded: Any) -> list[int]:
    """The ids of one sequence, from whatever a tokenizer (or `apply_chat_template`) returned: a list of ids, a
    `BatchEncoding` or dict with `input_ids`, or a tensor / array of one row."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list | tuple):  # a batch of one
        if len(encoded) != 1:
            raise DiffcoderError(f"expected the ids of one sequence, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(i) for i in encoded]


def chat_prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of `messages` ([{"role", "content"}, ...]) laid out by the tokenizer's chat template, with the
    assistant turn's opening when `add_generation_prompt` (a prompt to answer) and without it (a whole
    conversation, e.g. SFT data). No special tokens are added beyond what the template writes."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplateError("this tokenizer has no chat template, so chat messages cannot be laid out")
    encoded = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                            tokenize=True)
    return token_ids(encoded)


__all__ = ["chat_prompt_ids", "has_chat_template", "token_ids", "NoChatTemplateError"]
