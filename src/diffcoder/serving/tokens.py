"""Single tokens as clients see them in logprobs: their exact bytes and text, in the OpenAI shapes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from diffcoder.serving.engine import TokenScore


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character each byte is written as in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Maps token ids to (text, bytes). Byte-level BPE vocabularies give each token's exact bytes (a token may
    hold part of a UTF-8 character: its text then shows U+FFFD); other tokenizers decode the token alone."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, bytes]] = {}  # bounded by the vocabulary

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            if self.byte_level:
                table = _byte_level_table()
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                raw = b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
            else:
                raw = self.tokenizer.decode([token_id]).encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def chat_logprobs(self, scores: list[TokenScore]) -> dict[str, Any]:
        """{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None} (chat completions)."""
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text, raw = self(token_id)
            return {"token": text, "logprob": lp, "bytes": list(raw)}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                            for t, lp, alts in scores], "refusal": None}

    def completion_logprobs(self, scores: list[TokenScore], offset: int = 0) -> dict[str, Any]:
        """{tokens, token_logprobs, top_logprobs, text_offset} (legacy completions); each top_logprobs entry
        holds the k alternatives and the chosen token."""
        tokens = [self(t)[0] for t, _, _ in scores]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        tops = [{**{self(a)[0]: alp for a, alp in alts}, self(t)[0]: lp} for t, lp, alts in scores]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in scores], "top_logprobs": tops,
                "text_offset": offsets}
