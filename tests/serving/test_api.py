"""The HTTP API on a real server over loopback: shapes, answers, streaming order, stop, usage, errors."""

from __future__ import annotations

import json

import httpx
import pytest
from serving_helpers import chat_prompt_ids, expected_answer, read_sse

from diffcoder.decoding import block_spans

PROMPTS = ["def add(a, b):", "for i in range(10):\n", "class Stack:\n    def", "import os"]


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.base + path, json=body, timeout=120, **kw)


def ids_of(reference, text: str) -> list[int]:
    return reference[1](text)["input_ids"]


def test_models_and_health(server):
    r = httpx.get(server.base + "/v1/models", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [server.model_name]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 4096
    h = httpx.get(server.base + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == server.model_name


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_matches_decoder_alone(server, reference, prompt):
    r = post(server, "/v1/completions", {"model": server.model_name, "prompt": prompt, "max_tokens": 24})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected_answer(reference, ids_of(reference, prompt), 24)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == server.model_name
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == want["text"]
    assert choice["finish_reason"] == want["finish_reason"]
    assert body["usage"] == {"prompt_tokens": len(ids_of(reference, prompt)), "completion_tokens": len(want["ids"]),
                             "total_tokens": len(ids_of(reference, prompt)) + len(want["ids"])}


def test_max_tokens_not_multiple_of_block_is_trimmed(server, reference):
    r = post(server, "/v1/completions", {"model": server.model_name, "prompt": PROMPTS[0], "max_tokens": 7})
    want = expected_answer(reference, ids_of(reference, PROMPTS[0]), 7)
    assert r.json()["choices"][0]["text"] == want["text"]
    assert r.json()["usage"]["completion_tokens"] == len(want["ids"]) <= 7


def test_diffusion_settings_change_the_decode(server, reference):
    prompt = PROMPTS[1]
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 16, "steps_per_block": 2, "block_length": 8}
    r = post(server, "/v1/completions", body)
    want = expected_answer(reference, ids_of(reference, prompt), 16, steps_per_block=2, block_length=8)
    assert r.json()["choices"][0]["text"] == want["text"]
    # `steps` (the official total) is the same request spelled differently
    r2 = post(server, "/v1/completions", {**body, "steps_per_block": None, "steps": 4})
    assert r2.status_code == 200, r2.text
    assert r2.json()["choices"][0]["text"] == want["text"]


def test_chat_completion(server, reference):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sum a list."}]
    r = post(server, "/v1/chat/completions", {"model": server.model_name, "messages": messages, "max_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = chat_prompt_ids(reference, messages)
    want = expected_answer(reference, ids, 20)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": want["text"]}
    assert choice["finish_reason"] == want["finish_reason"]
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(want["ids"])


def test_n_and_prompt_lists_and_usage(server, reference):
    r = post(server, "/v1/completions", {"model": server.model_name, "prompt": PROMPTS[:2], "max_tokens": 12, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    wants = [expected_answer(reference, ids_of(reference, p), 12) for p in PROMPTS[:2]]
    assert [c["text"] for c in body["choices"]] == [wants[0]["text"]] * 2 + [wants[1]["text"]] * 2
    prompt_tokens = sum(len(ids_of(reference, p)) for p in PROMPTS[:2])
    completion = 2 * sum(len(w["ids"]) for w in wants)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}
    # token-id prompts are accepted as they are
    ids = ids_of(reference, PROMPTS[0])
    r = post(server, "/v1/completions", {"model": server.model_name, "prompt": ids, "max_tokens": 12})
    assert r.json()["choices"][0]["text"] == expected_answer(reference, ids, 12)["text"]


def _stop_for(text: str) -> str:
    """A stop string taken from the middle of an answer (so the cut is visible)."""
    for start in range(len(text) // 3, len(text) - 2):
        s = text[start : start + 2]
        if s.strip() and "\ufffd" not in s and text.index(s) > 0:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings(server, reference):
    prompt = PROMPTS[0]
    full = expected_answer(reference, ids_of(reference, prompt), 40)
    assert len(full["text"]) > 8, "precondition: the tiny model writes enough text to cut"
    stop = _stop_for(full["text"])
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 40, "stop": [stop, "\x00never\x00"]}
    r = post(server, "/v1/completions", body).json()
    cut = full["text"][: full["text"].index(stop)]
    assert r["choices"][0]["text"] == cut
    assert r["choices"][0]["finish_reason"] == "stop"
    # usage counts the tokens up to the one that completed the stop string, not the whole canvas
    tok = reference[1]
    k = next(k for k in range(1, len(full["ids"]) + 1) if stop in tok.decode(full["ids"][:k], skip_special_tokens=True))
    assert r["usage"]["completion_tokens"] == k
    # streaming stops at the same place and never sends a piece of the stop string
    with httpx.stream("POST", server.base + "/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        events = read_sse(resp)
    chunks = [json.loads(d) for e, d in events if d != "[DONE]"]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == cut
    assert stop not in streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streaming_completion_event_order(server, reference):
    prompt = PROMPTS[2]
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 32, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = read_sse(resp)
    assert events[-1] == (None, "[DONE]")
    assert all(e is None for e, _ in events), "diffusion events must be off by default"
    chunks = [json.loads(d) for _, d in events[:-1]]
    want = expected_answer(reference, ids_of(reference, prompt), 32)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(want["ids"])
    content = chunks[:-1]
    assert content[-1]["choices"][0]["finish_reason"] == want["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert "".join(c["choices"][0]["text"] for c in content) == want["text"]
    # at most one chunk per committed block (+ the finish chunk), and more than one: it really streams
    n_blocks = len(block_spans(len(ids_of(reference, prompt)), 32, 4))
    assert 1 < len(content) - 1 <= n_blocks


def test_streaming_chat_event_order(server, reference):
    messages = [{"role": "user", "content": "Reverse a string."}]
    body = {"model": server.model_name, "messages": messages, "max_tokens": 24, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as resp:
        events = read_sse(resp)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    want = expected_answer(reference, chat_prompt_ids(reference, messages), 24)
    assert chunks[-1]["choices"][0]["finish_reason"] == want["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want["text"]
    assert "usage" not in chunks[-1]


def test_diffusion_events_replay_the_canvas(server, reference):
    """The playground extension: commit events cover every canvas slot once, in block order, and replaying
    them gives the answer's tokens."""
    prompt = PROMPTS[0]
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 16, "stream": True,
            "diffusion_events": True, "steps_per_block": 2}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=120) as resp:
        events = read_sse(resp)
    diff = [json.loads(d) for e, d in events if e == "diffusion"]
    assert diff[0]["type"] == "start" and diff[0]["gen_length"] == 16 and diff[0]["steps_per_block"] == 2
    assert diff[-1]["type"] == "done"
    commits = [d for d in diff if d["type"] == "commit"]
    want = expected_answer(reference, ids_of(reference, prompt), 16, steps_per_block=2)
    canvas: dict[int, int] = {}
    for c in commits:
        for pos, tid in zip(c["positions"], c["token_ids"]):
            assert pos not in canvas, "a slot is committed once"
            canvas[pos] = tid
    assert [c["block"] for c in commits] == sorted(c["block"] for c in commits)
    assert [c["step"] for c in commits] == list(range(1, len(commits) + 1))
    # 2 steps per block and 4-slot blocks: each step commits 2 slots (the first block may hold prompt tail)
    assert max(len(c["positions"]) for c in commits) == 2
    replay = [canvas[i] for i in range(len(want["ids"]))]
    assert replay == want["ids"]
    # the diffusion events come before the text chunk of the same block
    kinds = [("d" if e == "diffusion" else "t") for e, d in events if d != "[DONE]"]
    assert kinds.index("t") > kinds.index("d")


BAD = [
    ("malformed JSON", b"{not json", 400, "not valid JSON", None),
    ("body not an object", b"[1, 2]", 400, "JSON object", None),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist", "model"),
    ("missing prompt", {"model": "M"}, 400, "prompt", "prompt"),
    ("max_tokens wrong type", {"model": "M", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "max_tokens"),
    ("temperature wrong type", {"model": "M", "prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("stream wrong type", {"model": "M", "prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    ("n zero", {"model": "M", "prompt": "x", "n": 0}, 400, "n", "n"),
    ("max_tokens zero", {"model": "M", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("max_tokens beyond context", {"model": "M", "prompt": "x", "max_tokens": 5000}, 400, "context", "max_tokens"),
    ("block_length zero", {"model": "M", "prompt": "x", "block_length": 0}, 400, "block_length", "block_length"),
    ("steps not a multiple of blocks", {"model": "M", "prompt": "x", "max_tokens": 8, "steps": 3}, 400,
     "multiple of the number of blocks", "steps"),
    ("too many steps per block", {"model": "M", "prompt": "x", "steps_per_block": 9}, 400, "between 1 and",
     "steps_per_block"),
    ("steps and steps_per_block", {"model": "M", "prompt": "x", "steps": 4, "steps_per_block": 2}, 400,
     "either", "steps"),
    ("threshold out of range", {"model": "M", "prompt": "x", "threshold": 1.5}, 400, "threshold", "threshold"),
    ("unknown remasking", {"model": "M", "prompt": "x", "remasking": "best"}, 400, "remasking", "remasking"),
    ("empty prompt", {"model": "M", "prompt": ""}, 400, "empty", "prompt"),
    ("token id outside vocab", {"model": "M", "prompt": [1, 99999]}, 400, "vocabulary", "prompt"),
    ("too many stop strings", {"model": "M", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4",
     "stop"),
    ("stop wrong type", {"model": "M", "prompt": "x", "stop": 5}, 400, "stop", "stop"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_validation_errors(server, case):
    _, body, status, words, param = case
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model_name}
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert words.lower() in err["message"].lower()
    assert err["param"] == param


def test_chat_validation_and_unknown_route(server):
    r = post(server, "/v1/chat/completions", {"model": server.model_name, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(server, "/v1/chat/completions", {"model": server.model_name,
                                              "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.get(server.base + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_errors_do_not_hurt_the_server_or_other_requests(server, reference):
    import concurrent.futures as cf

    good = {"model": server.model_name, "prompt": PROMPTS[3], "max_tokens": 12}
    bad = [b"{", {"model": server.model_name, "prompt": "x", "max_tokens": 99999}, {"model": 3}]
    with cf.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(post, server, "/v1/completions", good) for _ in range(3)]
        futs += [pool.submit(httpx.post, server.base + "/v1/completions", timeout=30,
                             **({"content": b} if isinstance(b, bytes) else {"json": b})) for b in bad * 2]
        results = [f.result() for f in futs]
    want = expected_answer(reference, ids_of(reference, PROMPTS[3]), 12)["text"]
    assert [r.json()["choices"][0]["text"] for r in results[:3]] == [want] * 3
    assert all(r.status_code in (400, 404) for r in results[3:])
    assert httpx.get(server.base + "/health", timeout=10).json()["status"] == "ok"
