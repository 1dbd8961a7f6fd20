"""DecodeSettings: precedence (user > checkpoint > built-in), every check with its message, AR refusals, seeds."""

from __future__ import annotations

import pytest

from diffcoder.errors import DecodingError
from diffcoder.settings import DEFAULT_MAX_NEW_TOKENS, DecodeSettings

CKPT = {"block_length": 4, "shift": False, "remasking": "low_confidence", "temperature": 0.0}


def test_user_values_override_checkpoint_over_builtin():
    s = DecodeSettings.resolve({"temperature": 0.5, "block_length": None}, {**CKPT, "block_length": 8})
    assert (s.temperature, s.block_length, s.remasking) == (0.5, 8, "low_confidence")
    assert s.max_new_tokens == DEFAULT_MAX_NEW_TOKENS["generate"] and s.gen_length is None
    assert DecodeSettings.resolve({}, CKPT, command="eval").max_new_tokens == DEFAULT_MAX_NEW_TOKENS["eval"]
    assert DecodeSettings.resolve({}, {}).block_length == 4  # nothing recorded: the paper's B


def test_checkpoint_gen_length_and_its_steps_per_block_carry_over():
    ck = {**CKPT, "gen_length": 64, "steps": 32}  # 2 steps per block of 4
    assert DecodeSettings.resolve({}, ck).generate_kwargs()["steps"] == 32
    s = DecodeSettings.resolve({"max_new_tokens": 10}, ck)  # user length: 3 blocks, still 2 steps per block
    assert (s.canvas_length, s.steps, s.steps_per_block) == (12, 6, 2)
    assert "gen_length" not in s.generate_kwargs()


@pytest.mark.parametrize("user,needle", [
    ({"block_length": 0}, "--block-length must be a whole number >= 1, got 0"),
    ({"block_length": 2.5}, "--block-length must be a whole number"),
    ({"gen_length": 10}, "--gen-length (10) must be a positive multiple of block_length (4); try 8 or 12"),
    ({"gen_length": 8, "max_new_tokens": 8}, "give either --gen-length or --max-new-tokens, not both"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be a whole number >= 1, got 0"),
    ({"gen_length": 8, "steps": 3}, "try steps=2 or 4"),
    ({"gen_length": 8, "steps": 0}, "--steps (0) must be a positive multiple"),
    ({"gen_length": 8, "steps": 16}, "more than the 8 slots to fill"),
    ({"threshold": 0.0}, "--threshold must be in (0, 1]"),
    ({"threshold": 1.5}, "--threshold must be in (0, 1]"),
    ({"temperature": -0.1}, "--temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "--temperature must be a finite number >= 0"),
    ({"remasking": "lowest"}, "--remasking must be one of low_confidence, random, got 'lowest'"),
    ({"eos_id": -2}, "--eos-id must be a token id, or -1"),
    ({"seed": 2**64}, "--seed must be a whole number in [0, 2**64)"),
    ({"seed": -1}, "--seed must be a whole number in [0, 2**64)"),
    ({"steps": 4, "steps_per_block": 1}, "give either --steps or --steps-per-block"),
    ({"bogus": 1}, "unknown decoding setting"),
])
def test_each_bad_value_names_itself_and_the_fix(user, needle):
    with pytest.raises(DecodingError) as e:
        DecodeSettings.resolve(user, CKPT)
    assert needle in str(e.value)


def test_a_bad_checkpoint_value_names_the_file_and_the_flag():
    with pytest.raises(DecodingError, match=r"block_length \(from the checkpoint's generation_config.json; "
                                            r"override it with --block-length\) must be"):
        DecodeSettings.resolve({}, {**CKPT, "block_length": 0})
    assert DecodeSettings.resolve({"block_length": 4}, {**CKPT, "block_length": 0}).block_length == 4


def test_server_labels_fields_by_their_json_names():
    with pytest.raises(DecodingError, match="^block_length must be"):
        DecodeSettings.resolve({"block_length": 0}, CKPT, command="serve", label=lambda k: k)
    s = DecodeSettings.resolve({"max_new_tokens": 10, "steps_per_block": 2}, CKPT, command="serve",
                               label=lambda k: k)
    assert (s.steps, s.steps_per_block) == (6, 2)
    with pytest.raises(DecodingError, match="steps_per_block must be between 1 and block_length"):
        DecodeSettings.resolve({"steps_per_block": 5}, CKPT, command="serve", label=lambda k: k)


def test_ar_refuses_diffusion_values_the_user_gave_and_ignores_the_checkpoints():
    with pytest.raises(DecodingError) as e:
        DecodeSettings.resolve_ar({"block_length": 4, "threshold": 0.9}, CKPT, extra_flags=["--show-denoising"])
    msg = str(e.value)
    assert "--block-length, --threshold and --show-denoising do not apply" in msg and "drop --ar" in msg
    s = DecodeSettings.resolve_ar({"gen_length": 10}, {**CKPT, "block_length": 0, "threshold": 0.5})
    assert s.ar_kwargs() == {"max_new_tokens": 10, "temperature": 0.0}


def test_sampling_without_a_seed_draws_one_and_greedy_needs_none():
    greedy, drew = DecodeSettings.resolve({}, CKPT).with_seed()
    assert not drew and greedy.seed is None
    seeds = {DecodeSettings.resolve({"temperature": 0.8}, CKPT).with_seed()[0].seed for _ in range(5)}
    assert len(seeds) > 1 and all(isinstance(x, int) for x in seeds)
    fixed, drew = DecodeSettings.resolve({"temperature": 0.8, "seed": 7}, CKPT).with_seed()
    assert not drew and fixed.seed == 7
    assert DecodeSettings.resolve({"remasking": "random"}, CKPT).sampling  # random remasking draws too


def test_the_decoder_itself_refuses_block_length_zero():
    """The official call path (no DecodeSettings) must not read 0 as 'the checkpoint's block size'."""
    from diffcoder.decoding import generate
    from diffcoder.testing import tiny_model

    with pytest.raises(DecodingError, match="block_length must be >= 1, got 0"):
        generate(tiny_model(), [[1, 2, 3]], block_length=0, max_new_tokens=4)


def test_sampling_filters_are_checked_and_their_off_values_are_none():
    s = DecodeSettings.resolve({"temperature": 0.7, "top_k": 0, "top_p": 1.0}, CKPT)
    assert (s.top_k, s.top_p) == (None, None) and "top_k" not in s.generate_kwargs()
    s = DecodeSettings.resolve({"temperature": 0.7, "top_k": 5, "top_p": 0.9}, CKPT)
    assert s.generate_kwargs()["top_k"] == 5 and s.generate_kwargs()["top_p"] == 0.9
    for bad, needle in (({"top_k": -3}, "--top-k must be a whole number"), ({"top_p": 0.0}, "--top-p must be in")):
        with pytest.raises(DecodingError, match=needle):
            DecodeSettings.resolve(bad, CKPT)
    with pytest.raises(DecodingError, match="drop --top-k, or drop --ar"):
        DecodeSettings.resolve_ar({"top_k": 5}, CKPT)


def test_batch_key_ignores_seed_end_token_and_filters_of_greedy_rows():
    a = DecodeSettings.resolve({"seed": 1, "top_k": 3, "eos_id": 5}, CKPT)
    b = DecodeSettings.resolve({"seed": 2}, CKPT)
    assert a != b and a.batch_key() == b.batch_key()
    hot = DecodeSettings.resolve({"temperature": 0.5, "top_k": 3}, CKPT)
    assert hot.batch_key() != DecodeSettings.resolve({"temperature": 0.5}, CKPT).batch_key()


def test_a_defaults_layer_may_set_the_length_and_steps_per_block():
    """A server's command line sits between the request and the checkpoint: its max_new_tokens beats the
    checkpoint's gen_length, and its steps per block shrink to a smaller block a request asks for."""
    layer = {**CKPT, "gen_length": 64, "steps": 64, "max_new_tokens": 10, "steps_per_block": 3}
    s = DecodeSettings.resolve({}, layer, command="serve")
    assert (s.max_new_tokens, s.canvas_length, s.steps_per_block) == (10, 12, 3)
    s = DecodeSettings.resolve({"block_length": 2}, layer, command="serve")
    assert (s.canvas_length, s.steps_per_block) == (10, 2)
    with pytest.raises(DecodingError, match=r"^temperature \(the server's\) must be"):
        DecodeSettings.resolve({}, {**layer, "temperature": -1}, default_label=lambda k: f"{k} (the server's)")
