"""Sampling filters (top_k, top_p) and per-commit log-probabilities, against references written here: the
nucleus by plain sorting, the draw's distribution by counting, and each committed token's log-probability by a
full recomputation of the canvas as it stood at that token's commit step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from diffcoder.decoding import filter_logits, generate, propose
from diffcoder.errors import DecodingError
from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model

MASK = 3


def kept_by_hand(logits: list[float], temperature: float, top_k: int | None, top_p: float | None) -> set[int]:
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if top_k:
        order = order[:top_k]
    if top_p is None:
        return set(order)
    z = [math.exp(logits[i] / temperature) for i in order]
    probs = [v / sum(z) for v in z]
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        kept.append(i)
        mass += p
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("top_k,top_p,temperature", [(None, 0.5, 1.0), (None, 0.9, 0.7), (5, None, 1.0),
                                                     (8, 0.6, 1.3), (1, None, 1.0), (None, 1e-9, 1.0),
                                                     (None, 1.0, 1.0), (0, 0.8, 2.0)])
def test_filter_keeps_the_reference_set(top_k, top_p, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 40, generator=gen, dtype=torch.float64) * 2
    logits[3, :10] = 1.5  # ties at the cut keep the lower ids
    out = filter_logits(logits, temperature, top_k, top_p)
    for row, filtered in zip(logits.tolist(), out):
        kept = {i for i, v in enumerate(filtered.tolist()) if v != -math.inf}
        assert kept == kept_by_hand(row, temperature, top_k, top_p)
        assert all(filtered[i] == row[i] for i in kept)  # kept logits are untouched


def test_top_p_stops_once_the_mass_is_reached():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]], dtype=torch.float64)  # exactly 0.5 and 0.5
    kept = filter_logits(logits, 1.0, None, 0.5)[0].tolist()
    assert kept[0] == 0.0 and kept[1:] == [-math.inf] * 3  # the first token alone reaches 0.5


def test_filtered_draw_follows_the_renormalised_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 0.3, -2.0], dtype=torch.float64)
    T, top_k, top_p = 0.8, 6, 0.85
    kept = kept_by_hand(logits.tolist()[:MASK] + [-math.inf] + logits.tolist()[MASK + 1:], T, top_k, top_p)
    n = 40_000
    gen = torch.Generator().manual_seed(1)
    x0, _ = propose(logits.expand(n, -1).clone(), MASK, T, generator=gen, top_k=top_k, top_p=top_p)
    counts = torch.bincount(x0, minlength=len(logits)).double() / n
    want = torch.zeros(len(logits), dtype=torch.float64)
    idx = torch.tensor(sorted(kept))
    want[idx] = torch.softmax(logits[idx] / T, -1)
    assert set(torch.nonzero(counts).flatten().tolist()) == kept
    assert (counts - want).abs().max() < 0.01, (counts, want)
    # without filters the same draw reaches tokens outside the nucleus
    x0_all, _ = propose(logits.expand(n, -1).clone(), MASK, T, generator=torch.Generator().manual_seed(1))
    assert set(x0_all.unique().tolist()) - kept


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11, dtype=torch.float64, std=0.6)


def test_filters_are_exact_at_temperature_zero(model):
    prompts = [[1, 5, 9, 4, 7], [8, 2]]
    kw = dict(steps=8, gen_length=16, block_length=4, return_result=True)
    plain = generate(model, prompts, **kw)
    filtered = generate(model, prompts, top_k=2, top_p=0.3, **kw)
    assert [s.tolist() for s in filtered.sequences] == [s.tolist() for s in plain.sequences]


def test_filters_change_sampling_and_top_k_one_is_greedy(model):
    prompt = [[1, 5, 9, 4, 7]]
    kw = dict(steps=16, gen_length=16, block_length=4, return_result=True)
    greedy = generate(model, prompt, **kw).sequences[0].tolist()
    sampled = {tuple(generate(model, prompt, temperature=1.5, generator=torch.Generator().manual_seed(s),
                              **kw).sequences[0].tolist()) for s in range(4)}
    assert tuple(greedy) not in sampled  # plain sampling wanders off the greedy path
    for s in range(4):
        top1 = generate(model, prompt, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(s), **kw)
        assert top1.sequences[0].tolist() == greedy


@pytest.mark.parametrize("threshold,steps,temperature,dtype", [(None, 8, 0.0, torch.float64),
                                                               (0.3, 16, 0.0, torch.float64),
                                                               (None, 16, 1.0, torch.float64),
                                                               (None, 8, 0.0, torch.float32)])
def test_logprobs_are_those_of_the_commit_step(model, threshold, steps, temperature, dtype):
    model = copy.deepcopy(model).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    prompt, B, gen_length = [1, 5, 9, 4, 7, 2], 4, 16
    events = []
    generate(model, [prompt], steps=steps, gen_length=gen_length, block_length=B, threshold=threshold,
             temperature=temperature, generator=torch.Generator().manual_seed(3), logprobs=3,
             on_event=lambda ev: events.append(ev) if ev.kind == "commit" else None)
    assert sum(len(e.positions) for e in events) == gen_length  # every generated slot, once
    x = prompt + [MASK] * gen_length
    for ev in events:  # replay: the canvas as it was just before this step's commits
        end = (max(ev.positions) // B + 1) * B
        ids = torch.tensor([x[:end]])
        pos = torch.arange(ids.shape[1])
        with torch.no_grad():
            logits = model(ids, attn_mask=block_causal_mask(pos, pos, B)[None, None])[0].double()
        logits[:, MASK] = -math.inf
        lp = torch.log_softmax(logits, -1)
        for q, tok, got, alts in zip(ev.positions, ev.token_ids, ev.logprobs, ev.top_logprobs):
            assert got == pytest.approx(float(lp[q, tok]), abs=tol)
            want_ids = lp[q].topk(3).indices.tolist()
            assert [i for i, _ in alts] == want_ids
            assert [v for _, v in alts] == pytest.approx(lp[q, want_ids].tolist(), abs=tol)
            x[q] = tok
    if temperature == 0:  # greedy: the committed token is the most likely one
        assert all(e.token_ids[j] == e.top_logprobs[j][0][0] for e in events for j in range(len(e.token_ids)))


def test_sampling_arguments_are_checked(model):
    with pytest.raises(DecodingError, match="top_p"):
        generate(model, [[1, 2]], steps=4, gen_length=4, top_p=0.0)
    with pytest.raises(DecodingError, match="top_k"):
        generate(model, [[1, 2]], steps=4, gen_length=4, top_k=-1)
