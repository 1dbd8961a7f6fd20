"""Fixtures: a tiny random checkpoint, a real uvicorn server on loopback, and the reference model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_helpers import CONTEXT, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, LiveServer

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


@pytest.fixture(scope="session")
def fim_checkpoint(tmp_path_factory):
    """A tiny model with FIM tokens and a Qwen-style <|fim_pad|> that it writes mid-way through the middle of
    FIM_PREFIX/FIM_SUFFIX: the LM-head rows of the pad and of a token it first writes there are swapped, so the pad
    wins where that token did (the logits are only relabelled)."""
    from diffcoder.checkpoint import save_checkpoint
    from diffcoder.testing import tiny_fim_tokenizer, tiny_model

    tok = tiny_fim_tokenizer(extra=(FIM_PAD,))
    model = tiny_model(seed=0, std=0.5, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                       eos_token_id=tok.eos_token_id, max_position_embeddings=CONTEXT)
    ids = diffcoder.infill(model, tok, FIM_PREFIX, FIM_SUFFIX, max_new_tokens=40, eos_id=-1).middle_ids
    t = ids[next(i for i in range(12, 40) if ids[i] not in ids[:i])]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[t, tok.convert_tokens_to_ids(FIM_PAD)]] = w[[tok.convert_tokens_to_ids(FIM_PAD), t]]
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-fim", tokenizer=tok)


@pytest.fixture(scope="session")
def fim_reference(fim_checkpoint):
    torch.set_num_threads(1)
    return diffcoder.load(fim_checkpoint)


@pytest.fixture(scope="session")
def fim_server(fim_checkpoint):
    s = LiveServer(fim_checkpoint, max_batch=8, max_queue=64)
    yield s
    s.close()
