"""Block-diffusion decoding with the official Stable-DiffCoder semantics (docs/design.md §2), batched and cached.

The rule itself is four small pure functions in `diffcoder.decode_rule` (re-exported here): `block_spans` (where
the blocks are), `commit_counts` (how many slots each step commits), `propose` (a token and a confidence per slot)
and `choose_commits` (which slots to commit). `generate` drives them: one forward per step over the current block,
earlier blocks from the KV cache, and the forward that writes a finished block's clean keys fused into the next
block's first step. On CUDA, `generate` and `generate_ar` hand the batch to `diffcoder.static_decoding` (fixed
shapes, no host syncs inside a block, CUDA graphs): same rule, same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from diffcoder.decode_batch import ActiveRows, Canvas, DecodeEvent, GenerationResult
from diffcoder.decode_rule import (
    StepRule,
    block_spans,
    choose_commits,
    commit_counts,
    denoise_step,
    filter_logits,
    propose,
    token_logprobs,
)
from diffcoder.errors import DecodingError
from diffcoder.masks import canvas_attention_mask
from diffcoder.settings import REMASKING
from diffcoder.static_decoding import decode_static

if TYPE_CHECKING:  # decoding needs only the model's interface, so it does not import the model module
    from diffcoder.model import DiffusionLM

__all__ = [
    "DecodeEvent", "GenerationResult", "StepRule", "block_spans", "check_prompt_fits", "check_token_ids",
    "choose_commits",
    "commit_counts", "denoise_step", "filter_logits", "generate", "generate_ar", "propose", "stop_token",
    "token_logprobs", "validate",
]

# ---------------------------------------------------------------------------------------------------------
# Argument handling


def _prompts_from(input_ids, attention_mask) -> list[torch.Tensor]:
    if hasattr(input_ids, "keys"):  # a tokenizer's output (BatchEncoding, dict): its ids and padding mask
        if attention_mask is None and "attention_mask" in input_ids:
            attention_mask = input_ids["attention_mask"]
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            return [row for row in input_ids]
        return [row[torch.as_tensor(m).bool()] for row, m in zip(input_ids, attention_mask)]
    if len(input_ids) and isinstance(input_ids[0], int):  # one prompt's ids
        input_ids, attention_mask = [input_ids], None if attention_mask is None else [attention_mask]
    rows = [torch.as_tensor(p, dtype=torch.long) for p in input_ids]
    return rows if attention_mask is None else [r[torch.as_tensor(m).bool()] for r, m in zip(rows, attention_mask)]


def _nearest_multiples(value: int, of: int) -> str:
    lo = value // of * of
    return " or ".join(str(c) for c in dict.fromkeys((lo, lo + of)) if c >= of)


def check_prompt_fits(prompt_len: int, new_tokens: int, max_positions: int, what: str) -> None:
    """A prompt must be non-empty, and prompt + generation must fit the model's positions."""
    if prompt_len < 1:
        raise DecodingError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if prompt_len + new_tokens > max_positions:
        raise DecodingError(
            f"prompt ({prompt_len} tokens) + {what} ({new_tokens}) exceeds the model's "
            f"{max_positions} positions; shorten the prompt or lower gen_length/max_new_tokens"
        )


def check_token_ids(prompts: list[torch.Tensor], vocab_size: int) -> None:
    """Every prompt id must be a row of the embedding (on CUDA an id outside it is a device-side assert that
    takes the process down, the server's included)."""
    for i, p in enumerate(prompts):
        if len(p) and (int(p.min()) < 0 or int(p.max()) >= vocab_size):
            bad = int(p.min()) if int(p.min()) < 0 else int(p.max())
            raise DecodingError(f"prompt {i} holds token id {bad}, outside this model's vocabulary "
                                f"(0..{vocab_size - 1}); encode prompts with this model's tokenizer")


def stop_token(eos_id: int | None, default: int | None) -> int | None:
    """The EOS id to stop at: the given one, the default when None, no stop at all for -1."""
    if eos_id is None:
        return default
    return None if eos_id < 0 else eos_id


def validate(prompt_len: int, gen_length: int, steps: int, block: int, max_positions: int) -> int:
    """Check the official code's constraints; return S, the steps per block."""
    if block < 1:
        raise DecodingError(f"block_length must be >= 1, got {block}")
    if gen_length < block or gen_length % block:
        raise DecodingError(
            f"gen_length ({gen_length}) must be a positive multiple of block_length ({block}); "
            f"try gen_length={_nearest_multiples(gen_length, block)}, or use max_new_tokens, which rounds up"
        )
    n_blocks = gen_length // block
    if steps < 1 or steps % n_blocks:
        raise DecodingError(
            f"steps ({steps}) must be a positive multiple of gen_length // block_length ({n_blocks}) so every "
            f"block gets the same number of steps; try steps={_nearest_multiples(steps, n_blocks)}"
        )
    check_prompt_fits(prompt_len, gen_length, max_positions, "gen_length")
    return steps // n_blocks


# ---------------------------------------------------------------------------------------------------------
# The driver: batched, cached


def use_static_path(model, static_cache: bool | None) -> bool:
    """The GPU decode path by default on CUDA; `static_cache` True/False forces either path (tests run the GPU
    path on the CPU)."""
    return model.device.type == "cuda" if static_cache is None else static_cache


@torch.no_grad()
def generate(
    model: DiffusionLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor],
    steps: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = REMASKING[0],
    tokenizer=None,
    shift: bool | None = None,
    threshold: float | None = None,
    eos_id: int | None = None,
    mask_id: int | None = None,
    max_new_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    on_event: Callable[[DecodeEvent], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    generator: torch.Generator | None = None,
    return_result: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    logprobs: int | None = None,
    static_cache: bool | None = None,
    cuda_graphs: bool | None = None,
    compile_steps: bool = False,
) -> torch.Tensor | GenerationResult:
    """Decode a batch of prompts. Accepts the official call unchanged; see docs/design.md §2 for the semantics.

    input_ids: [N, P] tensor (with `attention_mask` for padded rows), a list of id lists of any lengths, one
    prompt's ids, or a tokenizer's output (a BatchEncoding or dict with input_ids and attention_mask).
    Returns [N, L] ids (prompt + generation, right-padded with EOS), or a GenerationResult with
    `return_result=True`. eos_id defaults to the tokenizer's (else the config's); -1 disables the EOS stop.
    `on_event` receives commits as they happen; `cancelled(row)` is polled between
    blocks and drops that row (e.g. a client that went away). `top_k`/`top_p` filter the draw at temperature > 0
    (see `filter_logits`); `logprobs` (an int k >= 0) adds each committed token's log-probability at its commit
    step, and the k most likely alternatives, to the commit events.
    `static_cache` picks the decode path: None (default) takes the GPU path (`diffcoder.static_decoding`: fixed
    shapes, no host syncs inside a block) on CUDA and the CPU path elsewhere; `logprobs` always takes the CPU path.
    `cuda_graphs` (None: on CUDA for greedy decoding) replays each step as a CUDA graph on the GPU path;
    `compile_steps` runs its steps through torch.compile (the first call of a shape compiles).
    """
    cfg = model.config
    block = cfg.block_size if block_length is None else block_length  # 0 is an error, not "the default"
    if block < 1:
        raise DecodingError(f"block_length must be >= 1, got {block}")
    shift = cfg.shift if shift is None else shift
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    if mask_id is None:
        raise DecodingError(
            "this checkpoint has no mask token, so it cannot be decoded by diffusion; "
            "run `diffcoder convert` on it first (it adds one), or pass mask_id="
        )
    eos_id = stop_token(eos_id, tokenizer.eos_token_id if tokenizer is not None else cfg.eos_token_id)
    if temperature < 0:
        raise DecodingError(f"temperature must be >= 0, got {temperature}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise DecodingError(f"threshold must be in (0, 1] or None, got {threshold}")
    if remasking not in REMASKING:
        raise DecodingError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    if top_k is not None and top_k < 0:
        raise DecodingError(f"top_k must be >= 0 (0: off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise DecodingError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise DecodingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        gen_length = -(-max_new_tokens // block) * block
    gen_length = 512 if gen_length is None else gen_length
    steps = gen_length if steps is None else steps

    prompts = _prompts_from(input_ids, attention_mask)
    if not prompts:
        raise DecodingError("no prompts given")
    S = 1
    for p in prompts:
        S = validate(len(p), gen_length, steps, block, cfg.max_position_embeddings)
    check_token_ids(prompts, cfg.vocab_size)

    rule = StepRule(mask_id, temperature, remasking, threshold, top_k, top_p, generator)
    active = ActiveRows(len(prompts), on_event, cancelled)
    if use_static_path(model, static_cache) and logprobs is None:
        result = decode_static(model, prompts, S, gen_length, rule, block, shift, eos_id, active, on_event,
                               cuda_graphs=cuda_graphs, compile_steps=compile_steps)
    else:
        result = _decode(model, prompts, S, gen_length, rule, block, shift, eos_id,
                         _Events(active, on_event, mask_id, logprobs))
    if max_new_tokens is not None:
        result.sequences = [s[: p + max_new_tokens] for s, p in zip(result.sequences, result.prompt_lengths)]
    return result if return_result else result.padded(eos_id if eos_id is not None else (cfg.pad_token_id or 0),
                                                      model.device)


class _BlockForward:
    """The caching concern. Columns [0, committed) have clean keys in the KV cache; a block's first step also
    re-runs the previous block, now clean, writing its keys (the official code's extra commit forward, fused).
    With shift, the hidden state before a block predicts its first slot."""

    def __init__(self, model, rows: int, width: int, block: int, shift: bool):
        self.model, self.block, self.shift = model, block, shift
        self.cache = model.new_cache(rows, width)
        self.committed = 0
        self.prev_hidden = None  # final hidden state at column (block start - 1)
        self.forwards = 0

    def block_hidden(self, canvas: Canvas, s: int, e: int) -> torch.Tensor:
        """[rows, e - s, H]: the hidden state that predicts each slot of block [s, e)."""
        start = self.committed
        dev = canvas.ids.device
        q_cols, k_cols = torch.arange(start, e, device=dev), torch.arange(e, device=dev)
        attn = canvas_attention_mask(q_cols, k_cols, canvas.valid, self.block)
        hidden = self.model.hidden_states(canvas.ids[:, start:e], canvas.positions[:, start:e], attn, self.cache,
                                          start)
        self.forwards += 1
        if start < s:
            self.committed = s
            self.prev_hidden = hidden[:, s - start - 1]
        out = hidden[:, s - start :]
        if self.shift:  # position i-1 predicts column i; the block's first slot uses the previous block
            # (with no column before the block, its first slot is a prompt token: the stand-in is unused)
            before = self.prev_hidden if self.prev_hidden is not None else torch.zeros_like(out[:, 0])
            out = torch.cat([before[:, None], out[:, :-1]], dim=1)
        return out

    def keep_rows(self, idx: torch.Tensor) -> None:
        self.cache.keep_rows(idx.to(self.cache.k[0].device))
        if self.prev_hidden is not None:
            self.prev_hidden = self.prev_hidden[idx.to(self.prev_hidden.device)]


def _decode(model, prompts: list[torch.Tensor], S: int, gen_length: int, rule: StepRule, block: int, shift: bool,
            eos_id: int | None, events: _Events) -> GenerationResult:
    canvas = Canvas(prompts, gen_length, block, rule.mask_id, model.device)
    fwd = _BlockForward(model, len(prompts), canvas.width, block, shift)
    active = events.active
    steps_taken = 0
    for b in range(canvas.n_blocks):
        s, e = canvas.span(b)
        n = canvas.to_fill[:, s:e].sum(-1)  # masks per active row
        counts = torch.tensor([commit_counts(int(x), S) for x in n.tolist()], dtype=torch.long, device=n.device)
        step = 0
        while bool(canvas.to_fill[:, s:e].any()):
            k = counts[:, step] if step < S else torch.zeros_like(n)
            if rule.threshold is None and not bool(k.any()):
                step += 1  # a step that commits nothing is skipped, as in the official loop
                continue
            masked = canvas.to_fill[:, s:e].clone()
            # The LM head and softmax run only where a prediction is needed: the still-masked slots.
            logits_m = model.lm_head(fwd.block_hidden(canvas, s, e)[masked])
            x0, commit = denoise_step(logits_m, masked, k, rule)
            canvas.commit(s, e, x0, commit)
            steps_taken += int(commit.any(-1).sum())
            events.commits(canvas, commit, x0, masked, logits_m, b, step, s, fwd.forwards)
            step += 1
        keep = []
        for r in range(len(active.rows)):
            done, gen_start, blk_end = canvas.finish_block(r, s, e, eos_id)
            events.block(canvas, r, b, step, gen_start, blk_end, fwd.forwards)
            if active.settle(r, done, canvas.ids[r, int(canvas.pads[r]) : blk_end], b, step, fwd.forwards):
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(active.rows):
            idx = torch.tensor(keep)
            active.rows = [active.rows[r] for r in keep]
            canvas.keep_rows(idx)
            fwd.keep_rows(idx)
    return GenerationResult(sequences=[active.finished[i] for i in range(len(prompts))],
                            prompt_lengths=[len(p) for p in prompts], forwards=fwd.forwards, steps=steps_taken)


class _Events:
    """Streaming: commit and block events of the rows still decoding (a no-op without `on_event`)."""

    def __init__(self, active: ActiveRows, on_event, mask_id: int, logprobs: int | None):
        self.active, self.on_event, self.mask_id = active, on_event, mask_id
        self.logprobs = logprobs if on_event is not None else None

    def commits(self, canvas: Canvas, commit, x0, masked, logits_m, b: int, step: int, s: int, forwards: int):
        if self.on_event is None:
            return
        scores = (_slot_logprobs(logits_m, x0[masked], masked, self.mask_id, self.logprobs)
                  if self.logprobs is not None else None)
        for r in torch.nonzero(commit.any(-1)).flatten().tolist():
            c = torch.nonzero(commit[r]).flatten()
            ev = DecodeEvent("commit", self.active.rows[r], b, step, (c + s - int(canvas.pads[r])).tolist(),
                             x0[r, c].tolist(), forwards)
            if scores is not None:
                ev.logprobs, ev.top_logprobs = scores(r, c)
            self.on_event(ev)

    def block(self, canvas: Canvas, r: int, b: int, step: int, gen_start: int, blk_end: int, forwards: int):
        if self.on_event is not None and gen_start < blk_end:
            pad = int(canvas.pads[r])
            self.on_event(DecodeEvent("block", self.active.rows[r], b, step, list(range(gen_start - pad,
                                      blk_end - pad)), canvas.ids[r, gen_start:blk_end].tolist(), forwards))


def _slot_logprobs(logits_m, x0_m, masked, mask_id, top):
    """For commit events: (logprobs, top alternatives) of row r's slots c, from the masked slots' logits."""
    chosen, best = token_logprobs(logits_m, x0_m, mask_id, top)
    index = torch.full(masked.shape, -1, dtype=torch.long, device=masked.device)
    index[masked] = torch.arange(len(x0_m), device=masked.device)

    def scores(r: int, c: torch.Tensor):
        i = index[r, c]
        alts = [[]] * len(i) if best is None else [
            list(zip(ids.tolist(), lps.tolist())) for ids, lps in zip(best.indices[i], best.values[i])]
        return chosen[i].tolist(), alts

    return scores


@torch.no_grad()
def generate_ar(
    model: DiffusionLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor],
    max_new_tokens: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    on_event: Callable[[DecodeEvent], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    generator: torch.Generator | None = None,
    return_result: bool = False,
    static_cache: bool | None = None,
    cuda_graphs: bool | None = None,
    compile_steps: bool = False,
) -> torch.Tensor | GenerationResult:
    """Plain autoregressive decoding (causal attention, KV cache, one token per forward): the AR baseline.

    Same inputs and outputs as `generate`; rows are left-padded so every row's next token sits in one column.
    On CUDA it runs on the GPU path of `generate` (AR is block 1 with shift); `static_cache`, `cuda_graphs` and
    `compile_steps` as there."""
    cfg = model.config
    device = model.device
    eos_id = stop_token(eos_id, cfg.eos_token_id)
    if max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = _prompts_from(input_ids, attention_mask)
    for p in prompts:
        check_prompt_fits(len(p), max_new_tokens, cfg.max_position_embeddings, "max_new_tokens")
    check_token_ids(prompts, cfg.vocab_size)
    if use_static_path(model, static_cache):
        rule = StepRule(cfg.mask_token_id, temperature, "low_confidence", None, None, None, generator)
        result = decode_static(model, prompts, 1, max_new_tokens, rule, 1, True, eos_id,
                               ActiveRows(len(prompts), on_event, cancelled), on_event, ar=True,
                               cuda_graphs=cuda_graphs, compile_steps=compile_steps)
        return result if return_result else result.padded(eos_id if eos_id is not None else 0, device)
    N = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    P = int(lens.max())
    pads = (P - lens).to(device)
    width = P + max_new_tokens
    canvas = torch.zeros((N, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        canvas[i, int(pads[i]) : P] = p.to(device)
    cols = torch.arange(width, device=device)
    valid = cols[None] >= pads[:, None]
    positions = (cols[None] - pads[:, None]).clamp(min=0)
    padded = bool((pads > 0).any())
    cache = model.new_cache(N, width)
    active = ActiveRows(N, on_event, cancelled)
    rows = active.rows
    q = torch.arange(P, device=device)
    attn = canvas_attention_mask(q, q, valid, 1)
    logits = model.lm_head(model.hidden_states(canvas[:, :P], positions[:, :P], attn, cache, 0)[:, -1])
    forwards = 1
    for t in range(max_new_tokens):
        col = P + t
        tok, _ = propose(logits, cfg.mask_token_id, temperature, "low_confidence", generator)
        canvas[:, col] = tok
        keep = []
        for r in range(len(rows)):
            if on_event is not None:
                on_event(DecodeEvent("commit", rows[r], t, t, [col - int(pads[r])], [int(tok[r])], forwards))
                on_event(DecodeEvent("block", rows[r], t, t, [col - int(pads[r])], [int(tok[r])], forwards))
            done = (eos_id is not None and int(tok[r]) == eos_id) or col + 1 == width
            if active.settle(r, done, canvas[r, int(pads[r]) : col + 1], t, t, forwards):
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(rows):
            canvas, valid, positions, pads = active.shrink(keep, cache, canvas, valid, positions, pads)
            rows = active.rows
        # One query per row; with no left padding every cached key is valid and no mask is needed.
        attn = valid[:, None, None, : col + 1] if padded else None
        logits = model(canvas[:, col : col + 1], positions[:, col : col + 1], attn, cache, col)[:, -1]
        forwards += 1
    result = GenerationResult(
        sequences=[active.finished[i] for i in range(N)], prompt_lengths=[len(p) for p in prompts],
        forwards=forwards, steps=sum(len(active.finished[i]) - len(p) for i, p in enumerate(prompts)),
    )
    return result if return_result else result.padded(eos_id if eos_id is not None else 0, device)
