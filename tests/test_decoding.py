"""The decoder against a deliberately simple reference written here from the rules of docs/design.md §2: no cache,
no batching, full recomputation of the whole visible canvas every step, plain Python loops."""

from __future__ import annotations

import itertools
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from diffcoder.decoding import block_spans, choose_commits, commit_counts, generate, generate_ar
from diffcoder.errors import DecodingError
from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model

MASK = 3


@pytest.fixture(params=[False, True], ids=["cpu-path", "gpu-path"])
def dec(request):
    """Both decode paths: the CPU one and the GPU one (`static_decoding`: fixed shapes, no host syncs inside a
    block), the latter run here on the CPU. Every test that takes `dec` must hold for both."""
    return SimpleNamespace(static=request.param, generate=partial(generate, static_cache=request.param),
                           generate_ar=partial(generate_ar, static_cache=request.param))


@pytest.fixture(scope="module")
def model():
    # float64 so cached and recomputed logits agree far beyond any argmax/confidence gap.
    return tiny_model(seed=11, dtype=torch.float64, std=0.6)


def reference_generate(model, prompt, steps, gen_length, B, threshold=None, eos_id=None, shift=False):
    P = len(prompt)
    x = list(prompt) + [MASK] * gen_length
    S = steps // (gen_length // B)
    start = P - P % B
    blocks = [(s, min(s + B, P + gen_length)) for s in range(start, P + gen_length, B)]
    for s, e in blocks:
        todo = [i for i in range(s, e) if i >= P]
        n = len(todo)
        step = 0
        while todo:
            k = n // S + (1 if step < n % S else 0) if step < S else 0
            step += 1
            if threshold is None and k == 0:
                continue
            ids = torch.tensor([x[:e]])
            pos = torch.arange(e)
            with torch.no_grad():
                logits = model(ids, attn_mask=block_causal_mask(pos, pos, B)[None, None])[0].double()
            logits[:, MASK] = float("-inf")
            probs = torch.softmax(logits, -1)
            cand = {}
            for i in todo:
                row = probs[i - 1] if shift else probs[i]
                tok = int(row.argmax())
                cand[i] = (tok, float(row[tok]))
            ranked = sorted(todo, key=lambda i: -cand[i][1])
            if threshold is None:
                chosen = ranked[:k]
            else:
                chosen = [ranked[0]] + [i for i in ranked[1:] if cand[i][1] >= threshold]
            for i in chosen:
                x[i] = cand[i][0]
                todo.remove(i)
        gen = [i for i in range(s, e) if i >= P]
        hit = [i for i in gen if x[i] == eos_id] if eos_id is not None else []
        if hit:
            for i in range(hit[0], e):
                x[i] = eos_id
            return x[:e]
    return x


def test_commit_counts_formula():
    for n, S in itertools.product(range(0, 9), range(1, 9)):
        c = commit_counts(n, S)
        assert sum(c) == n and len(c) == S
        assert c == [n // S + (1 if j < n % S else 0) for j in range(S)]


def test_block_spans_follow_absolute_alignment():
    assert block_spans(8, 8, 4) == [(8, 12), (12, 16)]
    assert block_spans(6, 8, 4) == [(4, 8), (8, 12), (12, 14)]  # prompt tail, then a shortened last block
    for P, B in itertools.product(range(1, 12), (1, 2, 4, 8)):
        spans = block_spans(P, 4 * B, B)
        assert all(s % B == 0 for s, _ in spans)
        assert spans[-1][1] == P + 4 * B
        assert sum(e - max(s, P) for s, e in spans) == 4 * B


def test_choose_commits_rules():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.2, 0.3, 0.95, 0.1]], dtype=torch.float64)
    masked = torch.tensor([[True, False, True, True], [True, True, True, True]])
    top2 = choose_commits(conf, masked, torch.tensor([2, 1]), None)
    assert top2.tolist() == [[False, False, True, True], [False, False, True, False]]
    thr = choose_commits(conf, masked, torch.tensor([0, 0]), 0.6)
    # the single best masked slot is always committed, plus every masked slot >= threshold
    assert thr.tolist() == [[False, False, False, True], [False, False, True, False]]
    low = choose_commits(conf, masked, torch.tensor([0, 0]), 0.99)
    assert low.sum(-1).tolist() == [1, 1]


CASES = [
    # (prompt_len, block, gen_length, steps, threshold)
    *[(P, 4, 16, 16, None) for P in (4, 5, 6, 7)],  # every P % B
    *[(P, 4, 16, 8, None) for P in (5, 8)],  # two commits per step
    *[(P, 4, 16, 4, None) for P in (6,)],  # S=1: a whole block per step
    (9, 2, 12, 12, None), (10, 2, 12, 6, None),
    (13, 8, 16, 16, None), (11, 8, 24, 9, None),
    *[(P, 4, 16, 16, 0.05) for P in (5, 8)],
    (7, 4, 16, 4, 0.3),  # threshold with S < B: the official loop would leave masks; we never do
    (3, 1, 8, 8, None),
]


@pytest.mark.parametrize("P,B,gen,steps,thr", CASES)
@pytest.mark.parametrize("shift", [False, True])
def test_matches_reference(model, P, B, gen, steps, thr, shift, dec):
    prompt = torch.randint(4, 384, (P,), generator=torch.Generator().manual_seed(P * 100 + B)).tolist()
    ref = reference_generate(model, prompt, steps, gen, B, thr, None, shift)
    res = dec.generate(model, [prompt], steps=steps, gen_length=gen, block_length=B, threshold=thr, shift=shift,
                   mask_id=MASK, eos_id=-1, return_result=True)
    assert res.sequences[0].tolist() == ref
    assert MASK not in res.sequences[0].tolist()


@pytest.mark.parametrize("P", [5, 8, 10])
def test_eos_stop_matches_reference(model, P, dec):
    prompt = torch.randint(4, 384, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    free = dec.generate(model, [prompt], steps=32, gen_length=32, block_length=4, mask_id=MASK, return_result=True,
                    eos_id=-1).generated[0].tolist()
    eos = free[9]  # a token the model emits in its third block or so: it becomes the stop token
    ref = reference_generate(model, prompt, 32, 32, 4, None, eos)
    out = dec.generate(model, [prompt], steps=32, gen_length=32, block_length=4, mask_id=MASK, eos_id=eos,
                   return_result=True).sequences[0].tolist()
    assert out == ref
    assert len(out) < P + 32 and out[-1] == eos and len(out) % 4 == 0


def test_batch_equals_rows_alone(model, dec):
    prompts = [torch.randint(4, 384, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 9, 6, 12, 5)]
    eos = 100
    kw = dict(steps=24, gen_length=24, block_length=4, mask_id=MASK, eos_id=eos, return_result=True)
    batch = dec.generate(model, prompts, **kw)
    for i, p in enumerate(prompts):
        alone = dec.generate(model, [p], **kw)
        assert batch.sequences[i].tolist() == alone.sequences[0].tolist()
    padded = dec.generate(model, prompts, **{**kw, "return_result": False})
    assert padded.shape[0] == 5 and padded[0, : len(batch.sequences[0])].tolist() == batch.sequences[0].tolist()


def test_forwards_per_block_is_exactly_steps(model, dec):
    prompt = list(range(10, 18))  # P % B == 0: 4 blocks of 4 masks, S = 4
    res = dec.generate(model, [prompt], steps=16, gen_length=16, block_length=4, mask_id=MASK, return_result=True,
                   eos_id=-1)
    # the official loop spends 4 * (4 + 1) = 20; the GPU path runs the prompt's first block as a separate prefill
    assert res.forwards == 16 + dec.static


def test_events_replay_to_the_result(model, dec):
    prompt = list(range(20, 26))
    events = []
    res = dec.generate(model, [prompt], steps=8, gen_length=16, block_length=4, mask_id=MASK, return_result=True,
                   on_event=events.append, eos_id=-1)
    canvas = {}
    for ev in events:
        if ev.kind == "commit":
            for p, t in zip(ev.positions, ev.token_ids):
                assert p not in canvas  # each slot is committed exactly once
                canvas[p] = t
    seq = res.sequences[0].tolist()
    assert {p: seq[p] for p in canvas} == canvas and sorted(canvas) == list(range(6, 22))
    streamed = [t for ev in events if ev.kind == "block" for t in ev.token_ids]
    assert streamed == seq[6:] and events[-1].kind == "done"
    assert events[-1].forwards == res.forwards == 5 * 2  # 5 blocks (P % B = 2) x S = 2; on the done event


def test_cancelled_row_stops_early(model, dec):
    prompts = [list(range(10, 15)), list(range(30, 37))]
    res = dec.generate(model, prompts, steps=32, gen_length=32, block_length=4, mask_id=MASK, return_result=True,
                   cancelled=lambda row: row == 0, eos_id=-1)
    assert len(res.sequences[0]) < 5 + 32 and len(res.sequences[1]) == 7 + 32


def test_max_new_tokens_rounds_up_and_trims(model, dec):
    prompt = list(range(10, 17))
    res = dec.generate(model, [prompt], max_new_tokens=10, block_length=4, mask_id=MASK, return_result=True, eos_id=-1)
    full = dec.generate(model, [prompt], gen_length=12, steps=12, block_length=4, mask_id=MASK, return_result=True,
                    eos_id=-1)
    assert res.sequences[0].tolist() == full.sequences[0].tolist()[: 7 + 10]


def test_block_one_with_shift_is_greedy_ar(model, dec):
    prompt = list(range(40, 47))
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            pos = torch.arange(x.shape[1])
            logits = model(x, attn_mask=block_causal_mask(pos, pos, 1)[None, None])[:, -1]
            logits[:, MASK] = float("-inf")
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
    diff = dec.generate(model, [prompt], steps=12, gen_length=12, block_length=1, shift=True, mask_id=MASK, eos_id=-1)
    ar = dec.generate_ar(model, [prompt], 12, eos_id=-1)
    assert diff[0].tolist() == x[0].tolist() == ar[0].tolist()


def test_generate_ar_batch_equals_rows(model, dec):
    prompts = [list(range(5, 9)), list(range(50, 61)), [7]]
    batch = dec.generate_ar(model, prompts, 10, eos_id=77, return_result=True)
    for i, p in enumerate(prompts):
        assert batch.sequences[i].tolist() == dec.generate_ar(model, [p], 10, eos_id=77, return_result=True).sequences[0].tolist()


def test_official_call_signature_unchanged(model):
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    out = model.generate(ids, steps=8, gen_length=8, block_length=4, temperature=0., remasking="low_confidence",
                         tokenizer=None, shift=False, threshold=None, eos_id=-1)
    assert out.shape == (1, 13) and out[0, :5].tolist() == [11, 12, 13, 14, 15]


def test_sampling_is_reproducible_with_a_generator(model, dec):
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=1.0, remasking="random", mask_id=MASK)
    a = dec.generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(1), **kw)
    b = dec.generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(1), **kw)
    c = dec.generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(gen_length=10, steps=10, block_length=4), "gen_length (10) must be a positive multiple of block_length (4)"),
    (dict(gen_length=16, steps=6, block_length=4), "steps=4 or 8"),
    (dict(gen_length=16, steps=16, block_length=4, threshold=1.5), "threshold must be in (0, 1]"),
    (dict(gen_length=16, steps=16, remasking="entropy"), "remasking must be"),
    (dict(gen_length=600, steps=600, block_length=4), "exceeds the model's 512 positions"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_decoding_arguments_name_the_fix(model, kwargs, needle):
    with pytest.raises(DecodingError) as err:
        generate(model, [[5, 6, 7]], mask_id=MASK, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("bad", [384, -1])
def test_token_ids_outside_the_vocabulary_are_refused(model, bad):
    with pytest.raises(DecodingError, match=f"token id {bad}, outside this model's vocabulary"):
        generate(model, [[5, 6, 7], [5, bad]], mask_id=MASK, gen_length=4, steps=4)
    with pytest.raises(DecodingError, match="encode prompts with this model's tokenizer"):
        generate_ar(model, [[5, bad]], 4)


def test_missing_mask_token_points_to_convert():
    m = tiny_model(seed=0, mask_token_id=None)
    with pytest.raises(DecodingError, match="diffcoder convert"):
        generate(m, [[1, 2, 3]], gen_length=4, steps=4)
