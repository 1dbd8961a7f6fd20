"""Config values are checked against their keys' types (pydantic), and a wrong one names the key and a valid
value."""

from __future__ import annotations

import pytest

from diffcoder.errors import ConfigError
from diffcoder.training.config import apply_overrides, from_dict


def test_values_take_their_keys_types():
    cfg = from_dict({"optim": {"lr": "1e-3", "beta2": 1}, "lora": {"targets": "q_proj, v_proj"},
                     "model": {"path": 123, "block_size": None, "shift": True}})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.beta2, float) and cfg.optim.beta2 == 1.0
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.model.path == "123" and cfg.model.block_size is None and cfg.model.shift is True
    assert from_dict(apply_overrides({}, ["lora.targets=[q_proj, o_proj]"])).lora.targets == ["q_proj", "o_proj"]


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "steps", "ten", "train.steps must be an integer, got 'ten' (e.g. train.steps=100)"),
    ("train", "steps", True, "train.steps must be an integer, got True"),
    ("train", "steps", 2.5, "train.steps must be an integer, got 2.5"),
    ("train", "steps", None, "train.steps may not be null; give a value (e.g. train.steps=100)"),
    ("optim", "lr", "fast", "optim.lr must be a number, got 'fast' (e.g. optim.lr=0.0001)"),
    ("optim", "lr", False, "optim.lr must be a number, got False"),
    ("train", "bf16", "yes", "train.bf16 must be true or false, got 'yes' (e.g. train.bf16=true)"),
    ("lora", "targets", 5, "lora.targets must be a list, got 5"),
    ("model", "path", ["a"], "model.path must be a string, got ['a']"),
])
def test_a_wrong_value_names_the_key_and_a_valid_value(section, key, value, message):
    with pytest.raises(ConfigError) as err:
        from_dict({section: {key: value}})
    assert str(err.value).startswith(message)
