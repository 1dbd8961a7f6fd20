"""The official `openai` client, unchanged, against the server (plain and streaming, both endpoints)."""

from __future__ import annotations

import openai
import pytest
from serving_helpers import chat_prompt_ids, expected_answer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_models_list(client, server):
    assert [m.id for m in client.models.list()] == [server.model_name]


def test_completion(client, server, reference):
    r = client.completions.create(model=server.model_name, prompt="def add(a, b):", max_tokens=20)
    want = expected_answer(reference, reference[1]("def add(a, b):")["input_ids"], 20)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == want["finish_reason"]
    assert r.usage.completion_tokens == len(want["ids"])


def test_completion_stream_with_diffusion_settings(client, server, reference):
    prompt = "for i in range(10):\n"
    stream = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=16, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"steps_per_block": 2, "block_length": 8})
    chunks = list(stream)
    want = expected_answer(reference, reference[1](prompt)["input_ids"], 16, steps_per_block=2, block_length=8)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert chunks[-1].usage.completion_tokens == len(want["ids"])


def test_chat(client, server, reference):
    messages = [{"role": "user", "content": "Write is_even."}]
    r = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=20, temperature=0)
    want = expected_answer(reference, chat_prompt_ids(reference, messages), 20)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == len(chat_prompt_ids(reference, messages))


def test_chat_stream(client, server, reference):
    messages = [{"role": "user", "content": "Write fizzbuzz."}]
    stream = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=24, stream=True)
    chunks = list(stream)
    want = expected_answer(reference, chat_prompt_ids(reference, messages), 24)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == want["finish_reason"]


def test_client_sees_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=server.model_name, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="remasking"):
        client.completions.create(model=server.model_name, prompt="x", max_tokens=4,
                                  extra_body={"remasking": "nope"})
