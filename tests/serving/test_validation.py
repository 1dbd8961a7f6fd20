"""Hostile and unsupported requests on a real server: each gets a 4xx in the OpenAI error shape naming the field,
and the server (engine thread included) keeps answering good requests exactly as before."""

from __future__ import annotations

import httpx
import pytest
from serving_helpers import expected_answer

M = "MODEL"  # replaced by the served name
DEEP = 100_000


def raw(text: str) -> bytes:
    return text.replace("MODEL", "tiny-coder").encode()


HOSTILE = [
    # (case, path, body (dict or raw bytes), status, param, words in the message)
    ("seed 2**64", "c", {"prompt": "x", "max_tokens": 4, "temperature": 0.7, "seed": 2**64}, 400, "seed", "seed"),
    ("seed below int64", "c", {"prompt": "x", "temperature": 0.7, "seed": -(2**63) - 1}, 400, "seed", "seed"),
    ("lone surrogate in prompt", "c", raw('{"model": "MODEL", "prompt": "a\\ud800b"}'), 400, "prompt", "surrogate"),
    ("lone surrogate in a prompt list", "c", raw('{"model": "MODEL", "prompt": ["ok", "\\udc00"]}'), 400,
     "prompt[1]", "surrogate"),
    ("lone surrogate in a chat message", "chat",
     raw('{"model": "MODEL", "messages": [{"role": "user", "content": "hi \\udfff"}]}'), 400,
     "messages[0].content", "surrogate"),
    ("lone surrogate in a content part", "chat",
     raw('{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
     400, "messages[0].content[0].text", "surrogate"),
    ("lone surrogate in stop", "c", raw('{"model": "MODEL", "prompt": "x", "stop": ["\\ud800"]}'), 400, "stop[0]",
     "surrogate"),
    ("deep nesting in prompt", "c", raw('{"model": "MODEL", "prompt": ' + "[" * DEEP + "]" * DEEP + "}"), 400, None,
     "too deeply"),
    ("deep nesting in an unknown field", "c",
     raw('{"model": "MODEL", "prompt": "x", "extra": ' + "{\"a\": " * DEEP + "1" + "}" * DEEP + "}"), 400, None,
     "too deeply"),
    ("NaN", "c", raw('{"model": "MODEL", "prompt": "x", "temperature": NaN}'), 400, None, "NaN"),
    ("Infinity", "c", raw('{"model": "MODEL", "prompt": "x", "top_p": Infinity}'), 400, None, "Infinity"),
    ("tools", "chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools",
     "tool calling"),
    ("tool_choice required", "chat", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice", "tool"),
    ("response_format json", "chat", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_object"}}, 400, "response_format", "structured"),
    ("logit_bias", "c", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", "logit_bias"),
    ("presence_penalty", "c", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "penalties"),
    ("best_of", "c", {"prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
    ("suffix", "c", {"prompt": "x", "suffix": "return y"}, 400, "suffix", "suffix"),
    ("echo", "c", {"prompt": "x", "echo": True}, 400, "echo", "echo"),
    ("top_p zero", "c", {"prompt": "x", "top_p": 0.0}, 400, "top_p", "top_p"),
    ("top_p above one", "c", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p"),
    ("top_k below -1", "c", {"prompt": "x", "top_k": -2}, 400, "top_k", "top_k"),
    ("logprobs above 20", "c", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ("logprobs as bool on completions", "c", {"prompt": "x", "logprobs": True}, 400, "logprobs", "logprobs"),
    ("top_logprobs without logprobs", "chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs", "logprobs: true"),
    ("top_logprobs above 20", "chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                       "top_logprobs": 21}, 400, "top_logprobs", "top_logprobs"),
    ("more prompts than rows", "c", {"prompt": ["x"] * 65}, 400, "prompt", "queue holds 64"),
    ("token ids beyond the context", "c", {"prompt": [5] * 5000}, 400, "prompt", "context"),
    ("a text far beyond the context", "c", {"prompt": "def f(): pass\n" * 200_000}, 400, "prompt", "context"),
    ("too many messages", "chat", {"messages": [{"role": "user", "content": "x"}] * 4097}, 400, "messages",
     "at most 4096"),
    ("a long stop string", "c", {"prompt": "x", "stop": ["y" * 1001]}, 400, "stop", "1000 characters"),
    ("a long list of wrong items", "c", {"prompt": [{}] * 60}, 400, "prompt", "more"),
    ("max_tokens huge", "c", {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens", "context"),
    ("steps huge", "c", {"prompt": "x", "max_tokens": 4, "steps": 10**30}, 400, "steps", "steps"),
]


def send(server, path: str, body) -> httpx.Response:
    url = server.base + ("/v1/chat/completions" if path == "chat" else "/v1/completions")
    if isinstance(body, bytes):
        return httpx.post(url, content=body.replace(b"tiny-coder", server.model_name.encode()),
                          headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url, json={"model": server.model_name, **body}, timeout=60)


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_is_refused_by_name(server, case):
    _, path, body, status, param, words = case
    r = send(server, path, body)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert words.lower() in err["message"].lower()
    assert len(err["message"]) < 600  # the client's junk is quoted briefly, never whole


def test_server_and_engine_survive_the_hostile_requests(server, reference):
    """The seed that once killed the decoder thread, then the rest: a good request still gets its answer."""
    for _, path, body, *_ in HOSTILE:
        assert send(server, path, body).status_code < 500
    ok = httpx.post(server.base + "/v1/completions", timeout=60, json={
        "model": server.model_name, "prompt": "x", "max_tokens": 4, "temperature": 0.7, "seed": 2**63 - 1, "n": 2})
    assert ok.status_code == 200, ok.text  # seed + 1 for the second choice wraps instead of overflowing
    r = httpx.post(server.base + "/v1/completions", timeout=60,
                   json={"model": server.model_name, "prompt": "def add(a, b):", "max_tokens": 12}).json()
    want = expected_answer(reference, reference[1]("def add(a, b):")["input_ids"], 12)
    assert r["choices"][0]["text"] == want["text"]
    h = httpx.get(server.base + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["engine_restarts"] == 0


NO_OPS = [("tools empty", {"tools": []}), ("tool_choice none", {"tool_choice": "none"}),
          ("response_format text", {"response_format": {"type": "text"}}), ("penalties zero",
          {"presence_penalty": 0, "frequency_penalty": 0.0}), ("logit_bias empty", {"logit_bias": {}}),
          ("unknown fields", {"store": False, "metadata": {"k": "v"}, "service_tier": "auto"})]


@pytest.mark.parametrize("fields", [f for _, f in NO_OPS], ids=[n for n, _ in NO_OPS])
def test_fields_that_ask_for_nothing_are_accepted(server, fields):
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "model": server.model_name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **fields})
    assert r.status_code == 200, r.text


def test_body_over_the_limit_gets_413_and_the_client_reads_it(server):
    body = b'{"model": "m", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    r = httpx.post(server.base + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "--max-body-mb" in r.json()["error"]["message"]
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_head_on_playground_and_health(server):
    for path, kind in (("/", "text/html"), ("/health", "application/json")):
        r = httpx.head(server.base + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.content == b""
