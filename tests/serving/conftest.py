"""Fixtures: a tiny random checkpoint, a real uvicorn server on loopback, and the reference model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_helpers import CONTEXT, LiveServer

import diffcoder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from diffcoder.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-coder", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="session")
def reference(checkpoint):
    """The model and tokenizer loaded on their own, to compute each answer as if served alone."""
    torch.set_num_threads(1)
    return diffcoder.load(checkpoint)


@pytest.fixture(scope="session")
def server(checkpoint):
    s = LiveServer(checkpoint, max_batch=8, max_queue=64)
    yield s
    s.close()


@pytest.fixture(scope="session")
def endless_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint that never writes EOS (its LM-head row is zero, so the EOS logit, 0, never wins
    against 383 random logits), so a request runs exactly as long as max_tokens says."""
    from diffcoder.checkpoint import save_checkpoint
    from diffcoder.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(seed=1, std=0.5, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                       eos_token_id=tok.eos_token_id, max_position_embeddings=CONTEXT)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "endless", tokenizer=tok)
