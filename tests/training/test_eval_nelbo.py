"""The trainer's logged `eval_nelbo` and `diffcoder eval likelihood` are one number: same rows, same t grid, same
masks, the mask token's logit suppressed in both (docs/design.md §3.6)."""

from __future__ import annotations

import json

import pytest
from train_helpers import base_overrides

from diffcoder.checkpoint import load_hf_dir
from diffcoder.evaluation.likelihood import evaluate_likelihood, load_token_sequences
from diffcoder.training.config import load_config
from diffcoder.training.trainer import train


@pytest.mark.parametrize("shift", [False, True])
def test_logged_eval_nelbo_equals_eval_likelihood(tiny_setup, tmp_path, shift):
    out = tmp_path / "run"
    cfg = load_config(None, base_overrides(tiny_setup, out, **{
        "train.steps": 3, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.eval_t_points": 3,
        "model.shift": shift}))
    train(cfg, quiet=True)
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    final = [r for r in logged if r["kind"] == "eval" and r["step"] == 3][-1]

    model, tok = load_hf_dir(out / "final")
    n_rows = cfg.train.eval_batches * cfg.train.micro_batch_size * cfg.train.grad_accum
    rows = load_token_sequences(tiny_setup["data"], tok, cfg.data.seq_len, n_rows * cfg.data.seq_len)
    assert rows.shape[0] >= 4  # the trainer, like this, takes the first rows of the val split (fewer when small)
    got = evaluate_likelihood(model, rows, t_points=cfg.train.eval_t_points, batch_size=3, progress=False)
    assert got["nelbo_per_token"] == pytest.approx(final["eval_nelbo"], rel=1e-5)
    assert got["ar_nll_per_token"] == pytest.approx(final["eval_ar_nll"], rel=1e-5)
