"""Turn an AR checkpoint (GGUF or HF directory) into a diffusion-ready HF directory (docs/design.md §1.2, §4)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffcoder.checkpoint import MASK_TOKEN_NAMES, find_mask_token, load_checkpoint, save_checkpoint
from diffcoder.model import DiffusionLM
from diffcoder.settings import DecodeSettings

NEW_MASK_TOKEN = "<|mask|>"


@torch.no_grad()
def grow_vocab(model: DiffusionLM, new_size: int) -> None:
    """Grow the embedding (and an untied output head) to `new_size` rows; new rows start at the mean row.

    The mean is a neutral input that sits inside the embedding distribution, so the first training steps with a
    new token see no outlier activations."""
    cfg = model.config
    extra = new_size - cfg.vocab_size
    if extra <= 0:
        return
    old = model.model.embed_tokens.weight
    grown = torch.cat([old, old.mean(0, keepdim=True).expand(extra, -1)])
    model.model.embed_tokens = nn.Embedding.from_pretrained(grown, freeze=False)
    if cfg.tie_word_embeddings:
        model.lm_head = nn.Linear(grown.shape[1], grown.shape[0], bias=False, device=grown.device, dtype=grown.dtype)
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        head = model.lm_head.weight
        grown_head = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
        model.lm_head = nn.Linear(grown_head.shape[1], grown_head.shape[0], bias=False, device=head.device,
                                  dtype=head.dtype)
        model.lm_head.weight.copy_(grown_head)
    cfg.vocab_size = new_size


@torch.no_grad()
def add_special_tokens(model: DiffusionLM, tokenizer, names: list[str] | tuple[str, ...]) -> list[int]:
    """Make every token in `names` exist in the tokenizer (as an additional special token) and in the model.

    Tokens the tokenizer already has keep their ids; new ones get the next ids, and the vocabulary grows when
    they fall past its (possibly padded) end. Returns the ids in the order of `names`."""
    missing = [n for n in names if tokenizer.convert_tokens_to_ids(n) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    grow_vocab(model, max(ids) + 1)
    return ids


@torch.no_grad()
def add_mask_token(model: DiffusionLM, tokenizer=None) -> tuple[DiffusionLM, object]:
    """Give the model a mask token: reuse one the tokenizer already has, else add `<|mask|>` (mean-row init)."""
    cfg = model.config
    existing = find_mask_token(tokenizer)
    if existing is not None:
        cfg.mask_token_id = existing
        return model, tokenizer
    if cfg.mask_token_id is not None and cfg.mask_token_id < cfg.vocab_size:
        return model, tokenizer
    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
        new_id = tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN)
    else:
        new_id = cfg.vocab_size
    grow_vocab(model, new_id + 1)
    cfg.mask_token_id = new_id
    return model, tokenizer


def convert_checkpoint(
    source: str | Path,
    target: str | Path,
    block_size: int = 4,
    shift: bool = False,
    dtype: str | torch.dtype | None = "float32",
) -> Path:
    """AR checkpoint -> diffusion-ready directory with `mask_token_id`, `block_size` and `shift` recorded.

    `block_size`/`shift` in config.json are what diffusion training targets. Until the model has been trained for
    them, its decoding defaults (generation_config.json) stay exact AR decoding: block_length 1 with shift, which is
    what an untrained AR head can actually do. `source`: a Hugging Face directory or a .gguf file (a built-in name
    or a training run: resolve it first with `diffcoder.loading.resolve_model`)."""
    loaded = load_checkpoint(source, dtype=dtype)
    model, tokenizer = add_mask_token(loaded.model, loaded.tokenizer)
    model.config.block_size = block_size
    model.config.shift = shift
    model.config.extra["diffusion_trained"] = False
    defaults = {"block_length": 1, "shift": True, "threshold": None, "remasking": DecodeSettings.remasking}
    return save_checkpoint(model, target, tokenizer=tokenizer, generation_defaults={**loaded.generation_config,
                                                                                   **defaults})


__all__ = ["add_mask_token", "add_special_tokens", "grow_vocab", "convert_checkpoint", "MASK_TOKEN_NAMES"]
