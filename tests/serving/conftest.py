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
