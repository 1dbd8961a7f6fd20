"""Loading the start point of a run: load it (`diffcoder.loading`), give an AR model a mask token, check
vocabularies."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcoder.errors import ConfigError
from diffcoder.loading import Loaded, load


def load_start_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Loaded:
    """The run's start point ready for diffusion training (it has a mask token id): unpacks as (model, tokenizer),
    and `.generation_config` holds the decoding defaults its saves keep."""
    loaded = load(spec, dtype=dtype, device=device)
    if loaded.model.config.mask_token_id is None:  # an AR start point: give it a mask token (mean-embedding row)
        from diffcoder.convert import add_mask_token

        loaded.model, loaded.tokenizer = add_mask_token(loaded.model, loaded.tokenizer)
    return loaded


def check_vocab(model, data_index: dict, model_tokenizer=None) -> None:
    """Token ids of the data must exist in the model and come from the same tokenizer."""
    vocab = model.config.vocab_size
    if data_index["vocab_size"] > vocab:
        raise ConfigError(
            f"the data was tokenized with a {data_index['vocab_size']}-token tokenizer "
            f"({data_index.get('tokenizer') or '?'}) but the model has only {vocab} embeddings; rebuild the data "
            "with the model's tokenizer (`diffcoder data build ... --tokenizer MODEL`)"
        )
    if model_tokenizer is not None and data_index.get("tokenizer_fingerprint"):
        from diffcoder.training.data import tokenizer_fingerprint

        fp = tokenizer_fingerprint(model_tokenizer, data_index["vocab_size"])
        if fp != data_index["tokenizer_fingerprint"]:
            raise ConfigError(
                "the data was tokenized with a different tokenizer than the model's "
                f"(data: {data_index.get('tokenizer') or '?'}); rebuild it with --tokenizer pointing at the model"
            )
