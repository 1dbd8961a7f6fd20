"""logprobs, top_k and top_p through the real server, checked against the model run here: every committed
token's distribution is recomputed by a full forward over the canvas as it stood at that token's commit step."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from serving_helpers import chat_prompt_ids, expected_answer, read_sse

from diffcoder.decoding import generate
from diffcoder.model import block_causal_mask

B = 4


def replay(reference, prompt_ids: list[int], commits: list[tuple[list[int], list[int]]]):
    """For each commit step (positions relative to the first generated slot, token ids): the model's logits
    [len(positions), vocab] at those slots, computed from scratch on the canvas just before that step."""
    model, _ = reference
    mask = model.config.mask_token_id
    P = len(prompt_ids)
    x = list(prompt_ids) + [mask] * (max(p for ps, _ in commits for p in ps) + 1)
    out = []
    for positions, tokens in commits:
        absolute = [P + p for p in positions]
        end = (max(absolute) // B + 1) * B
        ids = torch.tensor([x[:end]])
        pos = torch.arange(ids.shape[1])
        with torch.no_grad():
            logits = model(ids, attn_mask=block_causal_mask(pos, pos, B)[None, None])[0].double()
        logits[:, mask] = -math.inf
        out.append(logits[absolute])
        for q, t in zip(absolute, tokens):
            x[q] = t
    return out


def decoder_commits(reference, prompt_ids, max_tokens, steps_per_block):
    """Commit steps of the decoder run alone (greedy): the order the server must have followed too."""
    model, tok = reference
    events = []
    generate(model, [prompt_ids], steps=steps_per_block * (-(-max_tokens // B)), block_length=B,
             max_new_tokens=max_tokens, eos_id=tok.eos_token_id,
             on_event=lambda ev: events.append(ev) if ev.kind == "commit" else None)
    P = len(prompt_ids)
    return [([q - P for q in ev.positions], ev.token_ids) for ev in events]


def test_completion_logprobs_are_the_commit_step_logprobs(server, reference):
    prompt = "def add(a, b):"
    ids = reference[1](prompt)["input_ids"]
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 16, "steps_per_block": 2, "logprobs": 3}
    r = httpx.post(server.base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    commits = decoder_commits(reference, ids, 16, 2)
    by_position = {}
    for (positions, tokens), logits in zip(commits, replay(reference, ids, commits)):
        dist = torch.log_softmax(logits, -1)
        for j, (q, t) in enumerate(zip(positions, tokens)):
            by_position[q] = (t, float(dist[j, t]), dist[j].topk(3).indices.tolist())
    n = len(lp["tokens"])
    assert n == r.json()["usage"]["completion_tokens"] > 0
    tok = reference[1]
    for q in range(n):
        t, want_lp, top3 = by_position[q]
        assert lp["tokens"][q] == tok.decode([t])
        assert lp["token_logprobs"][q] == pytest.approx(want_lp, abs=1e-4)
        assert set(lp["top_logprobs"][q]) == {tok.decode([a]) for a in top3} | {tok.decode([t])}
    assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:i]) for i in range(n)]


def test_chat_logprobs_stream_and_whole_agree(server, reference):
    messages = [{"role": "user", "content": "Sum a list."}]
    body = {"model": server.model_name, "messages": messages, "max_tokens": 20, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", server.base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(d) for _, d in read_sse(r) if d != "[DONE]"]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    content = whole["logprobs"]["content"]
    assert streamed == content and whole["logprobs"]["refusal"] is None
    want = expected_answer(reference, chat_prompt_ids(reference, messages), 20)
    assert [e["token"] for e in content] == [reference[1].decode([t]) for t in want["ids"]]
    for e in content:
        alts = e["top_logprobs"]
        assert len(alts) == 2 and alts[0]["logprob"] >= alts[1]["logprob"]
        assert alts[0]["token"] == e["token"] and alts[0]["logprob"] == e["logprob"]  # greedy: the best one
    special = set(reference[1].all_special_tokens)
    text = b"".join(bytes(e["bytes"]) for e in content if e["token"] not in special).decode("utf-8", "replace")
    assert text == whole["message"]["content"]  # exact bytes: the tokens spell the answer


def committed(server, prompt: str, **sampling) -> list[tuple[list[int], list[int]]]:
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 24, "stream": True, "diffusion_events": True,
            "seed": 7, **sampling}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(d) for e, d in read_sse(r) if e == "diffusion"]
    return [(e["positions"], e["token_ids"]) for e in events if e["type"] == "commit"]


def ranks(reference, prompt: str, commits, temperature: float):
    """(rank of each committed token in its step's distribution, its step's probability mass above it)."""
    ids = reference[1](prompt)["input_ids"]
    out = []
    for (_, tokens), logits in zip(commits, replay(reference, ids, commits)):
        probs = torch.softmax(logits / temperature, -1)
        for j, t in enumerate(tokens):
            above = probs[j] > probs[j, t]
            out.append((int(above.sum()), float(probs[j][above].sum())))
    return out


def test_top_k_keeps_every_draw_among_the_k_most_likely(server, reference):
    prompt = "import os"
    free = ranks(reference, prompt, committed(server, prompt, temperature=2.0), 2.0)
    assert max(r for r, _ in free) >= 2  # plain sampling at T=2 leaves the top two
    kept = ranks(reference, prompt, committed(server, prompt, temperature=2.0, top_k=2), 2.0)
    assert len(kept) >= 24 and max(r for r, _ in kept) <= 1


def test_top_p_keeps_every_draw_inside_the_nucleus(server, reference):
    prompt = "class Stack:\n    def"
    free = ranks(reference, prompt, committed(server, prompt, temperature=1.5), 1.5)
    assert max(m for _, m in free) >= 0.5
    kept = ranks(reference, prompt, committed(server, prompt, temperature=1.5, top_p=0.5), 1.5)
    assert len(kept) >= 24 and max(m for _, m in kept) < 0.5  # the mass above a kept token is below top_p


def test_filters_change_nothing_at_temperature_zero(server, reference):
    prompt = "for i in range(10):\n"
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 16, "top_k": 1, "top_p": 0.1}
    r = httpx.post(server.base + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["text"] == expected_answer(reference, reference[1](prompt)["input_ids"], 16)["text"]
