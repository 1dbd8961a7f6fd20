"""The decoding rule of docs/design.md §2 as pure functions over tensors, shared by both decode paths
(`diffcoder.decoding`, `diffcoder.static_decoding`): where the blocks are (`block_spans`), how many slots a step
commits (`commit_counts`), a token and a confidence per slot (`propose`), and which slots commit (`choose_commits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffcoder.errors import DecodingError
from diffcoder.settings import REMASKING


def block_spans(prompt_len: int, gen_length: int, block: int) -> list[tuple[int, int]]:
    """Generation blocks [start, end) aligned to absolute multiples of `block` (docs/design.md §2.2).

    With r = P % B != 0 the first block holds the prompt tail and the last is shortened to r slots."""
    first = prompt_len - prompt_len % block
    end = prompt_len + gen_length
    return [(s, min(s + block, end)) for s in range(first, end, block)]


def commit_counts(n_masks: int, steps: int) -> list[int]:
    """Split n masks over `steps` steps: each gets n // S, the first n % S one more (docs/design.md §2.3)."""
    base, extra = divmod(n_masks, steps)
    return [base + (1 if j < extra else 0) for j in range(steps)]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Sampling filters before the draw: keep the `top_k` most likely tokens, then the smallest set whose
    probability under softmax(logits / T) reaches `top_p` (the most likely token always stays); the rest get
    -inf. Ties at the cut keep the lower token id. None (or top_k 0, top_p 1) leaves a filter off."""
    order = logits.argsort(dim=-1, descending=True, stable=True)
    ranked = logits.gather(-1, order)
    drop = torch.zeros_like(ranked, dtype=torch.bool)
    if top_k:
        drop[..., top_k:] = True
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(ranked.masked_fill(drop, -math.inf) / temperature, -1)
        drop |= (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
    return logits.scatter(-1, order, ranked.masked_fill(drop, -math.inf))


def propose(
    logits: torch.Tensor,
    mask_id: int | None,
    temperature: float = 0.0,
    remasking: str = REMASKING[0],
    generator: torch.Generator | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposed token and confidence per slot (docs/design.md §2.4). logits: [..., vocab] -> ([...], [...] float64).

    top_k/top_p filter the draw at temperature > 0 only (greedy keeps the top token anyway); the confidence is
    always read from the unfiltered distribution, as in the reference."""
    logits = logits.to(torch.float64)
    if mask_id is not None:
        logits[..., mask_id] = -math.inf  # the mask token is never a prediction
    if temperature > 0:
        drawn = filter_logits(logits, temperature, top_k, top_p) if top_k or top_p is not None else logits
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        x0 = (drawn.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        confidence = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    elif remasking == "random":
        confidence = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
    else:
        raise DecodingError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
    return x0, confidence


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int | None, top: int = 0):
    """log p(token) under the model's distribution at this step (mask token suppressed, no temperature or
    filters), and the `top` most likely (ids, logprobs) per slot. logits [n, vocab], tokens [n]."""
    logits = logits.to(torch.float64)
    if mask_id is not None:
        logits[..., mask_id] = -math.inf
    lp = torch.log_softmax(logits, -1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0]
    best = lp.topk(min(top, lp.shape[-1]), dim=-1) if top > 0 else None
    return chosen, best


def choose_commits(
    confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor, threshold: float | None
) -> torch.Tensor:
    """Which masked slots to commit this step (docs/design.md §2.5). All [rows, slots]; k: [rows] counts.

    threshold None: the k most confident masked slots. Else: the most confident one plus all with conf >= τ."""
    conf = confidence.masked_fill(~masked, -math.inf)
    if threshold is None:
        rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return masked & (rank < k[:, None])
    best = torch.zeros_like(masked)
    best.scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return masked & (best | (conf >= threshold))


@dataclass
class StepRule:
    """The settings that turn one step's logits into commits (docs/design.md §2.4, §2.5)."""

    mask_id: int
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


def denoise_step(logits_m: torch.Tensor, masked: torch.Tensor, k: torch.Tensor, rule: StepRule
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the rule on a block: (proposed ids [rows, slots], which slots commit [rows, slots]).

    logits_m: the logits of the still-masked slots only ([masked.sum(), vocab], in `masked`'s row-major order);
    k: [rows] commit counts of this step."""
    x0_m, conf_m = propose(logits_m, rule.mask_id, rule.temperature, rule.remasking, rule.generator, rule.top_k,
                           rule.top_p)
    x0 = torch.zeros(masked.shape, dtype=torch.long, device=masked.device).masked_scatter(masked, x0_m)
    conf = torch.full(masked.shape, -math.inf, dtype=torch.float64, device=masked.device).masked_scatter(
        masked, conf_m)
    return x0, choose_commits(conf, masked, k, rule.threshold)
