"""Prompt token ids from a request: the chat template, the raw prompt(s), or with `suffix` the fill-in-the-middle
prompt (`fim.infill_prompt_ids`: the prompt is the text before the gap), tokenized and checked.

`PromptBuilder.build` is plain blocking code: the app runs it on a small thread pool, never on the event loop.
A text far too long for the context is refused by its length alone, before the tokenizer sees it: no token
covers more characters than the longest entry of the vocabulary, so a text longer than `context` such tokens
cannot fit (a factor of 2 spares tokenizers whose normalizer merges characters)."""

from __future__ import annotations

from typing import Any

from diffcoder.chat import chat_prompt_ids, has_chat_template
from diffcoder.fim import FimTokens, find_fim_tokens, infill_prompt_ids, require_fim_tokens
from diffcoder.serving.schemas import APIError, ChatRequest, CompletionRequest


class PromptBuilder:
    def __init__(self, tokenizer, vocab_size: int, context: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context = context
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars = 2 * max(1, longest) * context
        self.fim = find_fim_tokens(tokenizer)  # None: this checkpoint cannot infill

    def infill_tokens(self, req: CompletionRequest | ChatRequest) -> FimTokens | None:
        """The FIM tokens to lay out an infilling request with; None for a plain request. An empty suffix on a
        checkpoint without FIM tokens asks for nothing to follow the answer: plain completion."""
        if isinstance(req, ChatRequest) or req.suffix is None or (req.suffix == "" and self.fim is None):
            return None
        if self.fim is None:
            try:
                require_fim_tokens(self.tokenizer, "this model")
            except Exception as exc:
                raise APIError(400, f"suffix: {exc}", param="suffix", code="unsupported_parameter") from None
        return self.fim

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def _fits(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_chars:
            raise APIError(400, f"{param} has {n_chars} characters, more than the model's {self.context}-token "
                                f"context can hold (at most {self.max_chars}); shorten it", param=param,
                           code="context_length_exceeded")

    def _ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization; give at least one token", param=param)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param=param)
        return ids

    def chat(self, req: ChatRequest) -> list[int]:
        if not self.has_chat_template:
            raise APIError(400, "this checkpoint's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._fits(sum(len(m["content"]) for m in msgs), "messages")
        return self._ids(chat_prompt_ids(self.tokenizer, msgs), "messages")

    def completion(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            items: list[Any] = [p]
        else:
            items = list(p)
        if not items:
            raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids",
                           param="prompt")
        for t in items:
            if isinstance(t, str):
                self._fits(len(t), "prompt")
        fim = self.infill_tokens(req)
        if fim is not None:
            self._fits(len(req.suffix), "suffix")
            return [self._ids(infill_prompt_ids(self.tokenizer, t, req.suffix, fim), "prompt") for t in items]
        return [self._ids(self.tokenizer(t)["input_ids"] if isinstance(t, str) else list(t), "prompt")
                for t in items]

    def build(self, req: CompletionRequest | ChatRequest) -> list[list[int]]:
        """One list of ids per prompt (a chat request has one)."""
        return [self.chat(req)] if isinstance(req, ChatRequest) else self.completion(req)
