"""The completions `suffix` field (fill-in-the-middle) on a real server, through the official `openai` client: the
answer is the middle that `diffcoder.infill` gives for the same prefix, suffix and settings, streamed or not."""

from __future__ import annotations

import httpx
import openai
import pytest
from serving_helpers import FIM_PREFIX as PREFIX
from serving_helpers import FIM_SUFFIX as SUFFIX

import diffcoder
from diffcoder.fim import infill_prompt_ids


@pytest.fixture(scope="module")
def client(fim_server):
    return openai.OpenAI(base_url=fim_server.base + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def infilled(reference, prefix=PREFIX, suffix=SUFFIX, **decoding):
    model, tok = reference
    return diffcoder.infill(model, tok, prefix, suffix, **decoding)


def test_the_pad_token_ends_the_middle(fim_reference):
    """The fixture works: the reference middle ends at <|fim_pad|> well before the token budget."""
    want = infilled(fim_reference, max_new_tokens=40)
    assert want.finish_reason == "stop" and 12 <= len(want.middle_ids) < 40


def test_suffix_through_the_openai_client(client, fim_server, fim_reference):
    r = client.completions.create(model=fim_server.model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=40)
    want = infilled(fim_reference, max_new_tokens=40)
    assert r.choices[0].text == want.middle and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    assert r.usage.completion_tokens == len(want.middle_ids)


def test_suffix_streaming_through_the_openai_client(client, fim_server, fim_reference):
    stream = client.completions.create(model=fim_server.model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=40,
                                       stream=True, stream_options={"include_usage": True},
                                       )
    chunks = list(stream)
    want = infilled(fim_reference, max_new_tokens=40)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.middle
    assert len([t for t in texts if t]) > 1  # it arrived block by block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.middle_ids)


def test_diffusion_settings_apply_to_the_middle(client, fim_server, fim_reference):
    for extra, decoding in [({"steps_per_block": 2}, {"steps": 20}), ({"block_length": 8}, {"block_length": 8}),
                            ({"threshold": 0.5}, {"threshold": 0.5})]:
        r = client.completions.create(model=fim_server.model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=40,
                                      extra_body=extra)
        want = infilled(fim_reference, max_new_tokens=40, **decoding)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want.middle, want.finish_reason), extra


def test_several_prompts_token_ids_and_a_stop_string(client, fim_server, fim_reference):
    other = "def sub(a, b):\n    return "
    r = client.completions.create(model=fim_server.model_name, prompt=[PREFIX, other], suffix=SUFFIX, max_tokens=24)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        infilled(fim_reference, p, max_new_tokens=24).middle for p in (PREFIX, other)]
    tok = fim_reference[1]
    ids = tok(PREFIX, add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(model=fim_server.model_name, prompt=ids, suffix=SUFFIX, max_tokens=24)
    assert by_ids.choices[0].text == r.choices[0].text
    full = infilled(fim_reference, max_new_tokens=24, eos_id=-1).middle
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() and full[i:i + 2] not in
                full[:i + 1])
    cut = client.completions.create(model=fim_server.model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                    stop=[stop])
    assert cut.choices[0].text == infilled(fim_reference, max_new_tokens=24, stop=[stop]).middle


def test_empty_suffix_is_infilling_with_nothing_after(client, fim_server, fim_reference):
    r = client.completions.create(model=fim_server.model_name, prompt=PREFIX, suffix="", max_tokens=16)
    assert r.choices[0].text == infilled(fim_reference, PREFIX, "", max_new_tokens=16).middle
    assert r.usage.prompt_tokens == len(infill_prompt_ids(fim_reference[1], PREFIX, ""))


def test_config_says_the_model_infills(fim_server, server):
    cfg = httpx.get(fim_server.base + "/v1/config", timeout=10).json()
    assert cfg["infill"]["prefix"] == "<|fim_prefix|>" and cfg["infill"]["order"] == "psm"
    assert httpx.get(server.base + "/v1/config", timeout=10).json()["infill"] is None


def test_a_model_without_fim_tokens_refuses_suffix_by_name(server, reference):
    plain = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        plain.completions.create(model=server.model_name, prompt=PREFIX, suffix=SUFFIX, max_tokens=8)
    body = err.value.body
    assert body["param"] == "suffix" and "fill-in-the-middle" in body["message"] and "--fim-rate" in body["message"]
    # an empty suffix asks for nothing to follow: plain completion, as without the field
    a = plain.completions.create(model=server.model_name, prompt=PREFIX, suffix="", max_tokens=8)
    b = plain.completions.create(model=server.model_name, prompt=PREFIX, max_tokens=8)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_refuses_suffix(fim_server):
    r = httpx.post(fim_server.base + "/v1/chat/completions", timeout=30, json={
        "model": fim_server.model_name, "messages": [{"role": "user", "content": "x"}], "suffix": SUFFIX})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "suffix" and "/v1/completions" in err["message"]
