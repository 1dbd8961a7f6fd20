"""One resolver and one loader: what each kind of model argument resolves to, the errors for anything else, and
the decoding defaults a load returns explicitly (nothing is hung on the nn.Module)."""

from __future__ import annotations

import json

import pytest

import diffcoder
from diffcoder.checkpoint import load_tokenizer, save_checkpoint
from diffcoder.errors import CheckpointError
from diffcoder.loading import resolve_model
from diffcoder.testing import tiny_model, tiny_tokenizer, write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


def test_run_directories_stand_for_their_checkpoint(ckpt, tmp_path):
    assert resolve_model(ckpt) == ckpt and resolve_model(str(ckpt)) == ckpt
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    for f in ckpt.iterdir():
        (run / "checkpoints" / "step-2" / f.name).write_bytes(f.read_bytes())
    (run / "checkpoints" / "latest").write_text("step-2\n")
    assert resolve_model(run) == run / "checkpoints" / "step-2"
    assert diffcoder.load(run).path == run / "checkpoints" / "step-2"


@pytest.mark.parametrize("make,words", [
    (lambda d: d / "missing", "neither a path nor a built-in name (smollm2, smollm2-ar)"),
    (lambda d: d, "has no config.json (a Hugging Face checkpoint), adapter_config.json (a LoRA adapter), final/"),
    (lambda d: (d / "weights.bin").write_bytes(b"x") and d / "weights.bin", "is a file but not a .gguf"),
])
def test_anything_else_is_one_error_naming_what_to_give(tmp_path, make, words):
    with pytest.raises(CheckpointError) as e:
        diffcoder.load(make(tmp_path))
    assert words in str(e.value)


def test_load_returns_the_defaults_explicitly_and_a_resave_keeps_them(tmp_path):
    model = tiny_model(seed=2, block_size=8)
    path = save_checkpoint(model, tmp_path / "a", tokenizer=tiny_tokenizer(),
                           generation_defaults={"threshold": 0.7, "steps": 16, "gen_length": 32})
    loaded = diffcoder.load(path)
    m, tok = loaded  # still unpacks as (model, tokenizer)
    assert m is loaded.model and tok is loaded.tokenizer and loaded[0] is m and len(loaded) == 2
    assert not hasattr(m, "generation_defaults")
    assert loaded.defaults["threshold"] == 0.7 and loaded.defaults["block_length"] == 8
    again = save_checkpoint(m, tmp_path / "b", generation_defaults=loaded.generation_config)
    first, second = (json.loads((p / "generation_config.json").read_text()) for p in (path, again))
    assert first == second
    assert diffcoder.load(again).defaults == loaded.defaults


def test_one_load_tokenizer_none_or_an_error_as_asked(ckpt, tmp_path):
    assert load_tokenizer(ckpt) is not None
    bare = save_checkpoint(tiny_model(seed=1), tmp_path / "bare")
    assert load_tokenizer(bare) is None
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        load_tokenizer(bare, required=True)
    from diffcoder.training.data import load_tokenizer as load_named_tokenizer

    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        load_named_tokenizer(str(bare))
