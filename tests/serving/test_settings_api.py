"""How a request's fields and the server's defaults become one DecodeSettings (no server needed): each refusal is
a 400 naming the field, or at start-up a one-line error naming the flag."""

from __future__ import annotations

import pytest

from diffcoder.errors import ConfigError
from diffcoder.serving.schemas import APIError, CompletionRequest, request_settings, server_defaults

CKPT = {"block_length": 4, "shift": False, "threshold": 0.8, "gen_length": 32, "steps": 16}


def req(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", prompt="x", **fields)


def test_request_fields_over_server_flags_over_the_checkpoint():
    defaults = server_defaults(CKPT, {"steps": 8, "max_new_tokens": None, "seed": 3}, context=64)
    assert defaults["steps_per_block"] == 1 and defaults["seed"] == 3  # --steps 8 over 8 blocks of the default
    s = request_settings(req(), defaults, prompt_len=2, context=64)
    assert (s.new_tokens, s.canvas_length, s.steps_per_block, s.threshold) == (32, 32, 1, 0.8)
    s = request_settings(req(max_tokens=6, steps_per_block=4, threshold=None), defaults, 2, 64)
    assert (s.canvas_length, s.total_steps, s.threshold) == (8, 8, None)  # an explicit null: no threshold
    assert request_settings(req(), defaults, prompt_len=40, context=64).new_tokens == 24  # the room left


@pytest.mark.parametrize("fields,param,words", [
    ({"remasking": "best"}, "remasking", "must be one of low_confidence, random"),
    ({"max_tokens": 8, "steps": 3}, "steps", "multiple of the number of blocks"),
    ({"steps_per_block": 9}, "steps_per_block", "between 1 and block_length (4)"),
    ({"max_tokens": 63}, "max_tokens", "context"),
])
def test_request_refusals_name_the_field(fields, param, words):
    with pytest.raises(APIError) as e:
        request_settings(req(**fields), server_defaults(CKPT, {}, 64), prompt_len=2, context=64)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.mark.parametrize("flags,words", [
    ({"steps_per_block": 9}, "--steps-per-block = 9: --steps-per-block must be between 1 and block_length (4)"),
    ({"max_new_tokens": 100}, "--max-new-tokens = 100: a canvas of 100 tokens"),
    ({"remasking": "best"}, "--remasking = 'best'"),
])
def test_start_up_refusals_name_the_flag(flags, words):
    with pytest.raises(ConfigError) as e:
        server_defaults(CKPT, flags, context=64)
    assert words in str(e.value)
    with pytest.raises(ConfigError, match=r"^temperature \(generation_config.json\) = -1"):
        server_defaults({**CKPT, "temperature": -1}, {}, context=64)
