"""Loading the start point of a run: resolve 'default', load, give an AR model a mask token, check vocabularies."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcoder.errors import CheckpointError, ConfigError

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "diffcoder" / "smollm2-135m-instruct"
MASK_TOKEN = "<|mask|>"


def resolve_model_path(spec: str | Path) -> Path:
    """'default' -> the embedded default (diffusion-ready HF dir); anything else is a path."""
    if str(spec) == "default":
        try:
            from diffcoder.pull import ensure_default_model  # type: ignore[import-not-found]

            return Path(ensure_default_model())
        except ImportError:
            if DEFAULT_CACHE_DIR.is_dir():
                return DEFAULT_CACHE_DIR
            raise CheckpointError("the embedded default model is not available; run `diffcoder pull smollm2` "
                                  "or set model.path to a checkpoint") from None
    p = Path(spec).expanduser()
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist; give a checkpoint directory, a .gguf or 'default'")
    return p


def add_mask_token(model, tokenizer):
    """Give an AR model a mask token: one new embedding row (the mean embedding) and a new tokenizer token.
    Prefers the core `diffcoder.convert.add_mask_token` when available."""
    try:
        from diffcoder.convert import add_mask_token as core_add  # type: ignore[import-not-found]

        return core_add(model, tokenizer)
    except ImportError:
        pass
    cfg = model.config
    emb = model.model.embed_tokens.weight
    new_id = cfg.vocab_size
    with torch.no_grad():
        row = emb.mean(0, keepdim=True)
        new_emb = torch.nn.Embedding(cfg.vocab_size + 1, cfg.hidden_size, device=emb.device, dtype=emb.dtype)
        new_emb.weight.copy_(torch.cat([emb, row]))
        model.model.embed_tokens = new_emb
        if cfg.tie_word_embeddings:
            model.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size + 1, bias=False)
            model.lm_head.weight = new_emb.weight
        else:
            head = model.lm_head.weight
            lm = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size + 1, bias=False, device=head.device, dtype=head.dtype)
            lm.weight.copy_(torch.cat([head, torch.zeros_like(head[:1])]))
            model.lm_head = lm
    cfg.vocab_size += 1
    cfg.mask_token_id = new_id
    if tokenizer is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
        if tokenizer.convert_tokens_to_ids(MASK_TOKEN) != new_id:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model {new_id + 1}; "
                                  "cannot align a new mask token")
    return model, tokenizer


def load_start_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) ready for diffusion training: has a mask token id."""
    import diffcoder

    model, tokenizer = diffcoder.load(resolve_model_path(spec), dtype=dtype, device=device)
    if model.config.mask_token_id is None:
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
