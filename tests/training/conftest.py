from __future__ import annotations

import pytest
from train_helpers import make_code_corpus

from diffcoder.testing import tiny_tokenizer, write_tiny_checkpoint
from diffcoder.training.data import build_corpus


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A tiny base checkpoint (with tokenizer and mask token) and a packed corpus built with its tokenizer."""
    root = tmp_path_factory.mktemp("train_setup")
    base = write_tiny_checkpoint(root / "base", seed=0, std=0.02)
    build_corpus([str(make_code_corpus(root / "src"))], tiny_tokenizer(), root / "data", val_fraction=0.1)
    return {"base": base, "data": root / "data", "root": root}
