"""Infilling: fill the gap between a prefix and a suffix with the block-diffusion decoder (docs/design.md §2.8).

Under block-causal attention a span sees only what precedes it on the canvas, so the suffix goes into the prompt in
fill-in-the-middle order (`fim.infill_prompt_ids`) and the middle is generated after it, block by block, until the
FIM end: EOS, a token of the checkpoint's that ends a middle (`FimTokens.end_ids`), or a stop string. Decoding
stops at the first finished block holding one of them; the middle is what `decoding.generate` produces from the
same prompt, cut there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffcoder.decoding import DecodeEvent, generate
from diffcoder.errors import DecodingError
from diffcoder.fim import FimTokens, infill_prompt_ids, require_fim_tokens
from diffcoder.settings import DecodeSettings


@dataclass
class InfillResult:
    """An infilled document: `text` is exactly `prefix + middle + suffix`."""

    prefix: str
    middle: str
    suffix: str
    prompt_ids: list[int]
    middle_ids: list[int]  # the middle's tokens (no end token)
    finish_reason: str  # "stop": an end token or stop string ended the middle; "length": the token budget did
    forwards: int  # model forwards (NFE)
    generated_tokens: int  # canvas tokens decoded (up to the block where decoding stopped)
    seconds: float
    settings: DecodeSettings
    fim: FimTokens = field(repr=False)

    @property
    def text(self) -> str:
        return self.prefix + self.middle + self.suffix

    @property
    def stats(self) -> dict[str, Any]:
        """Speed figures, in the shape `diffcoder generate --stats` prints."""
        return {"generated_tokens": self.generated_tokens, "middle_tokens": len(self.middle_ids),
                "forwards": self.forwards, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.generated_tokens / max(self.seconds, 1e-9), 2),
                "tokens_per_forward": round(self.generated_tokens / max(self.forwards, 1), 3),
                "finish_reason": self.finish_reason, "settings": self.settings.to_dict()}


def infill_settings(model, settings: DecodeSettings | None = None, defaults: Mapping[str, Any] | None = None,
                    **decoding: Any) -> DecodeSettings:
    """Decoding values (given as a DecodeSettings or as keywords, not both) over `defaults`, the checkpoint's
    decoding defaults (`diffcoder.load(...).defaults`; None: only the model config's block size and shift)."""
    if settings is not None:
        if decoding:
            raise DecodingError(f"give settings= or decoding keywords ({', '.join(sorted(decoding))}), not both")
        settings.validate()
        return settings
    defaults = {"block_length": model.config.block_size, "shift": model.config.shift, **(defaults or {})}
    return DecodeSettings.resolve(decoding, defaults, "generate", label=lambda k: k)


def end_token_ids(fim: FimTokens, eos_id: int | None) -> set[int]:
    """Tokens that end a middle: EOS and the checkpoint's own end-of-middle tokens (none when eos_id < 0)."""
    if eos_id is not None and eos_id < 0:
        return set()
    return set(fim.end_ids) | ({eos_id} if eos_id is not None else set())


class _MiddleWatch:
    """Follows the finished blocks of each row and says when its middle is over (an end token or a stop string),
    so the decoder drops the row there instead of filling the rest of its canvas."""

    def __init__(self, tokenizer, n_rows: int, ends: set[int], stop: Sequence[str],
                 forward: Callable[[DecodeEvent], None] | None) -> None:
        self.tok, self.ends, self.stop, self.forward = tokenizer, ends, stop, forward
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.over = [False] * n_rows

    def __call__(self, ev: DecodeEvent) -> None:
        r = ev.row
        if ev.kind == "block" and not self.over[r]:
            self.ids[r] += ev.token_ids  # a block event carries only generated positions
            text_done = self.stop and _first_stop(decode(self.tok, self.ids[r]), self.stop) >= 0
            self.over[r] = bool(self.ends & set(ev.token_ids)) or bool(text_done)
        if self.forward is not None:
            self.forward(ev)

    def cancelled(self, row: int) -> bool:
        return self.over[row]


def decode(tokenizer, ids: list[int]) -> str:
    """Text of generated ids, exactly: special tokens dropped, no clean-up of spaces (code is not prose)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def cut_middle(tokenizer, ids: list[int], ends: set[int], stop: Sequence[str]) -> tuple[list[int], str, str]:
    """(ids, text, finish_reason) of a generated middle: cut at the first end token, then at the first stop
    string (the ids keep the token that completed it, as the server's usage counts do)."""
    reason = "length"
    hit = next((i for i, t in enumerate(ids) if t in ends), None)
    if hit is not None:
        ids, reason = ids[:hit], "stop"
    text = decode(tokenizer, ids)
    cut = _first_stop(text, stop) if stop else -1
    if cut >= 0:
        text, reason = text[:cut], "stop"
        ids = next(ids[:k] for k in range(len(ids) + 1) if _first_stop(decode(tokenizer, ids[:k]), stop) >= 0)
    return ids, text, reason


def infill(model, tokenizer, prefix: str, suffix: str, *, settings: DecodeSettings | None = None,
           defaults: Mapping[str, Any] | None = None, stop: Sequence[str] | str | None = None,
           on_event: Callable[[DecodeEvent], None] | None = None, **decoding: Any) -> InfillResult:
    """Fill the gap between `prefix` and `suffix`; the result's `text` is `prefix + middle + suffix`.

    Decoding values go in as keywords (`max_new_tokens=64, threshold=0.9, ...`, the fields of
    `diffcoder.settings.DecodeSettings`) or as `settings=`; unset ones take `defaults`, the checkpoint's
    (`diffcoder.load(...).defaults`), else the built-in ones.
    `stop`: strings that end the middle (cut before them). `on_event`: the decoder's events, e.g. a
    `commands.DenoisingView` (positions count from the start of the FIM prompt). A checkpoint without FIM tokens
    raises `fim.NoFimTokensError`, which names how to train them in."""
    return infill_batch(model, tokenizer, [(prefix, suffix)], settings=settings, defaults=defaults, stop=stop,
                        on_event=on_event, **decoding)[0]


@torch.no_grad()
def infill_batch(model, tokenizer, gaps: Sequence[tuple[str, str]], *, settings: DecodeSettings | None = None,
                 defaults: Mapping[str, Any] | None = None, stop: Sequence[str] | str | None = None,
                 on_event: Callable[[DecodeEvent], None] | None = None, **decoding: Any) -> list[InfillResult]:
    """`infill` for many (prefix, suffix) gaps decoded together in one batch (rows leave it as their middles end).

    Greedy rows get exactly what `infill` gives each alone; sampling rows share one random stream. Each result's
    `forwards` and `seconds` are the whole batch's; `generated_tokens` its own."""
    fim = require_fim_tokens(tokenizer)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise DecodingError("stop strings must not be empty")
    if not gaps:
        raise DecodingError("no gaps to fill: give at least one (prefix, suffix) pair")
    settings, _ = infill_settings(model, settings, defaults, **decoding).with_seed()
    prompts = [infill_prompt_ids(tokenizer, prefix, suffix, fim) for prefix, suffix in gaps]
    eos = settings.eos_id if settings.eos_id is not None else tokenizer.eos_token_id
    ends = end_token_ids(fim, eos)
    watch = _MiddleWatch(tokenizer, len(prompts), ends, stops, on_event)
    gen = torch.Generator(device=model.device).manual_seed(settings.seed or 0)
    t0 = time.perf_counter()
    res = generate(model, prompts, tokenizer=tokenizer, on_event=watch, cancelled=watch.cancelled, generator=gen,
                   return_result=True, **{**settings.generate_kwargs(), "eos_id": eos})
    seconds = time.perf_counter() - t0
    out = []
    for (prefix, suffix), prompt, generated in zip(gaps, prompts, res.generated):
        ids, middle, reason = cut_middle(tokenizer, generated.tolist(), ends, stops)
        out.append(InfillResult(prefix=prefix, middle=middle, suffix=suffix, prompt_ids=prompt, middle_ids=ids,
                                finish_reason=reason, forwards=res.forwards, generated_tokens=len(generated),
                                seconds=seconds, settings=settings, fim=fim))
    return out


__all__ = ["infill", "infill_batch", "InfillResult", "infill_settings", "end_token_ids", "cut_middle", "decode"]
