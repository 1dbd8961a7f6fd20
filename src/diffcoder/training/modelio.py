"""Loading the start point of a run: resolve 'default', load, give an AR model a mask token, check vocabularies."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcoder.errors import CheckpointError, ConfigError


def resolve_model_path(spec: str | Path) -> Path:
    """A built-in name ('default' = 'smollm2': the diffusion default; 'smollm2-ar': its AR origin) -> its
    directory, built on first use; anything else is a path."""
    from diffcoder.pull import BUILTINS, resolve_model

    if str(spec) == "default" or str(spec) in BUILTINS:
        return resolve_model(str(spec))
    p = Path(spec).expanduser()
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist; give a checkpoint directory, a .gguf, 'smollm2' "
                              "(the diffusion default) or 'smollm2-ar' (its AR origin)")
    return p


def load_start_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) ready for diffusion training: has a mask token id."""
    import diffcoder

    model, tokenizer = diffcoder.load(resolve_model_path(spec), dtype=dtype, device=device)
    if model.config.mask_token_id is None:  # an AR start point: give it a mask token (mean-embedding row)
        from diffcoder.convert import add_mask_token

        model, tokenizer = add_mask_token(model, tokenizer)
    return model, tokenizer


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
