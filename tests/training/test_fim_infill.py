"""A tiny model trained on FIM data infills: the FIM tokens the data build added reach the trained checkpoint, and
`diffcoder.infill` on it lays out the prompt with them and returns prefix + middle + suffix (plumbing, not quality)."""

from __future__ import annotations

import random

from train_helpers import base_overrides

import diffcoder
from diffcoder.decoding import generate
from diffcoder.fim import FIM_TOKENS, find_fim_tokens
from diffcoder.infilling import infill_settings
from diffcoder.training.config import load_config
from diffcoder.training.data import build_corpus, load_tokenizer
from diffcoder.training.trainer import train


def test_a_fim_trained_tiny_model_infills(tiny_setup, tmp_path):
    r = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {r.randint(0, 99)}\n")
    build_corpus([str(src)], load_tokenizer(str(tiny_setup["base"])), tmp_path / "data", val_fraction=0.1,
                 fim_rate=0.5)
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "data.path": tmp_path / "data", "train.steps": 6, "objective.warmup_steps": 0}))
    train(cfg, quiet=True)

    model, tok = diffcoder.load(tmp_path / "run")
    fim = find_fim_tokens(tok)
    assert fim is not None and fim.names == FIM_TOKENS and fim.ids == (384, 385, 386)
    prefix, suffix = "def f7(x):\n    return ", "\n"
    res = diffcoder.infill(model, tok, prefix, suffix, max_new_tokens=16)
    assert res.text == prefix + res.middle + suffix
    assert res.prompt_ids[0] == fim.prefix_id and res.prompt_ids[-1] == fim.middle_id
    out = generate(model, [res.prompt_ids], return_result=True,
                   **{**infill_settings(model, max_new_tokens=16).generate_kwargs(), "eos_id": -1}).generated[0]
    ids = out.tolist()
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert res.middle_ids == ids
