"""Held-out likelihood without generating: the block-diffusion NELBO per token and the AR NLL per token.

The NELBO is `diffcoder.nelbo.diffusion_nelbo` (docs/design.md §3.6), the same definition, noise and t grid
as the trainer's logged `eval_nelbo`, so the two numbers can be compared. The AR NLL scores tokens 1..L-1
under causal attention, the mask token's logit suppressed as in every scoring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffcoder.errors import ConfigError
from diffcoder.masks import block_causal_mask
from diffcoder.nelbo import (
    EVAL_NOISE_SEED,
    ar_scored_rows,
    diffusion_nelbo,
    logits_loss_sum,
    nelbo_loss_sum,
    t_grid,
)


@torch.no_grad()
def ar_nll(model, x0: torch.Tensor) -> tuple[float, int]:
    """(next-token NLL summed over tokens 1..L-1 under causal attention, number of scored tokens)."""
    b, L = x0.shape
    dev = model.device
    pos = torch.arange(L, device=dev)
    logits = model(x0.to(dev), pos[None].expand(b, L), block_causal_mask(pos, pos, 1)[None, None])
    mask_id = model.config.mask_token_id
    suppress = mask_id if mask_id is not None and mask_id < logits.shape[-1] else None
    # the trainer's eval_ar_nll scores the same rows (nelbo.ar_scored_rows) with the same suppression
    scored = ar_scored_rows(b, L).to(dev)
    weights = torch.ones(b * (L - 1), dtype=torch.float64, device=dev)
    nll = logits_loss_sum(logits.double(), x0.to(dev), scored, weights, suppress_id=suppress)
    return float(nll), b * (L - 1)


# ------------------------------------------------------------------------------------------ data


_TEXT_SUFFIXES = {".txt", ".py", ".md", ".jsonl", ".json"}


def _texts_from_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            for key in ("text", "content", "code"):
                if isinstance(d.get(key), str):
                    out.append(d[key])
                    break
        return out
    return [path.read_text(encoding="utf-8", errors="replace")]


def load_token_sequences(data: str | Path, tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[n, seq_len] token rows from held-out data: a training shard folder (its validation split, when the
    training package is present), or text/.py/.jsonl files (a file or a folder of them) tokenized here and
    packed with EOS between documents."""
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"held-out data {path} does not exist; give a text/.py/.jsonl file or a folder")
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
    if path.is_dir() and (path / "index.json").is_file():
        try:
            from diffcoder.training.data import PackedRows  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ConfigError(f"{path} is a training shard folder but diffcoder.training is not installed; "
                              "pass the held-out source files instead") from exc
        rows = PackedRows(path, "val", seq_len)
        n = max(1, min(rows.num_rows, max_tokens // seq_len))
        return torch.cat(list(rows.sequential(64, max_rows=n)))
    if tokenizer is None:
        raise ConfigError("this checkpoint has no tokenizer files, so text data cannot be tokenized")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES) \
        if path.is_dir() else [path]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for f in files:
        for text in _texts_from_file(f):
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            if len(stream) >= max_tokens:
                break
        if len(stream) >= max_tokens:
            break
    n = min(len(stream), max_tokens) // seq_len
    if n == 0:
        raise ConfigError(f"{path} holds {len(stream)} tokens, fewer than one row of --seq-len {seq_len}; "
                          "give more text or lower --seq-len")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def evaluate_likelihood(model, rows: torch.Tensor, block_size: int | None = None, t_points: int = 8,
                        batch_size: int = 4, seed: int = EVAL_NOISE_SEED, progress: bool = True) -> dict:
    """Per-token NELBO (diffusion, fixed t grid) and AR NLL over `rows`, with perplexities."""
    from tqdm import tqdm

    cfg = model.config
    B = block_size or cfg.block_size
    if cfg.mask_token_id is None:
        raise ConfigError("this checkpoint has no mask token, so it has no diffusion likelihood; "
                          "run `diffcoder convert` on it first")
    ts = t_grid(t_points)
    n_batches = -(-len(rows) // batch_size)
    with tqdm(total=(t_points + 1) * n_batches, desc="likelihood", disable=not progress) as bar:
        nelbo, n_d = diffusion_nelbo(
            lambda x0, noise: nelbo_loss_sum(model, x0, noise, B, cfg.shift, cfg.mask_token_id),
            rows, torch.ones_like(rows, dtype=torch.bool), B, cfg.shift, t_points, batch_size, seed, bar.update)
        nelbo = float(nelbo)
        nll, n_a = 0.0, 0
        for i in range(0, len(rows), batch_size):
            s, n = ar_nll(model, rows[i : i + batch_size])
            nll, n_a = nll + s, n_a + n
            bar.update(1)
    return {
        "nelbo_per_token": nelbo / n_d, "ar_nll_per_token": nll / n_a,
        "nelbo_perplexity_bound": math.exp(nelbo / n_d), "ar_perplexity": math.exp(nll / n_a),
        "tokens": int(rows.numel()), "rows": len(rows), "seq_len": rows.shape[1], "block_size": B,
        "shift": cfg.shift, "t_grid": ts, "seed": seed,
    }
