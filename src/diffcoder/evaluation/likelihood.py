"""Held-out likelihood without generating: the block-diffusion NELBO per token and the AR NLL per token.

NELBO follows DESIGN §3 exactly, with a fixed grid of noise levels instead of random draws so two checkpoints
are scored on the same footing: for each t in the grid, every block is masked at rate u = min(1, max(t, 1/B))
(at least one token per block), the model runs on [x_t ; x_0] with the BD3-LM mask, and the cross-entropy
of the masked tokens, weighted by 1/u, is summed and divided by the number of loss-eligible tokens. The
result is the average over the grid (midpoint rule for the integral over t in (0, 1)).

shift=True (logits at i-1 score token i): a block's first token is scored from the clean half at i-1 (the
previous block's last clean position, exactly what the decoder uses), the others from the noisy half; token 0
has no predecessor and is not loss-eligible. With B=1 every token is a block's first token and t=1 masks it,
so the NELBO is then exactly the AR NLL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcoder.errors import ConfigError
from diffcoder.masks import block_causal_mask, two_stream_mask


def t_grid(points: int) -> list[float]:
    """Midpoints of `points` equal slices of (0, 1)."""
    if points < 1:
        raise ConfigError(f"the t grid needs at least one point, got {points}")
    return [(k + 0.5) / points for k in range(points)]


def mask_rate(t: float, block_size: int) -> float:
    """Block-wise clipped mask rate: u = min(1, max(t, 1/B))."""
    return min(1.0, max(t, 1.0 / block_size))


def eligible_positions(length: int, shift: bool) -> torch.Tensor:
    """bool [length]: positions that carry a loss (with shift, token 0 has no predecessor)."""
    e = torch.ones(length, dtype=torch.bool)
    if shift:
        e[0] = False
    return e


def draw_masks(shape: tuple[int, int], block_size: int, t: float, shift: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [b, L]: each eligible token masked i.i.d. at rate u(t); a block with none masked gets one, chosen
    uniformly among its eligible positions."""
    b, L = shape
    u = mask_rate(t, block_size)
    elig = eligible_positions(L, shift)
    masks = (torch.rand(shape, generator=generator, dtype=torch.float64) < u) & elig
    for s in range(0, L, block_size):
        e = min(s + block_size, L)
        slots = torch.nonzero(elig[s:e]).flatten() + s
        if len(slots) == 0:
            continue
        empty = ~masks[:, s:e].any(-1)
        if empty.any():
            pick = torch.randint(len(slots), (b,), generator=generator)
            rows = torch.nonzero(empty).flatten()
            masks[rows, slots[pick[rows]]] = True
    return masks


def masked_loss_sum(model, x0: torch.Tensor, masks: torch.Tensor, block_size: int, u: float,
                    mask_id: int, shift: bool, weighted: bool = True) -> torch.Tensor:
    """Sum over masked tokens of w * CE (w = 1/u when weighted), in float64. One forward on [x_t ; x_0]."""
    b, L = x0.shape
    dev = model.device
    x0 = x0.to(dev)
    masks = masks.to(dev)
    xt = torch.where(masks, torch.full_like(x0, mask_id), x0)
    pos = torch.arange(L, device=dev)
    ids = torch.cat([xt, x0], dim=1)
    positions = torch.cat([pos, pos])[None].expand(b, 2 * L)
    attn = two_stream_mask(L, block_size, dev)[None, None]
    hidden = model.hidden_states(ids, positions, attn)
    rows, cols = torch.nonzero(masks, as_tuple=True)
    if shift:
        first = cols % block_size == 0
        src = torch.where(first, L + cols - 1, cols - 1)  # the clean half for a block's first token
    else:
        src = cols
    logits = model.lm_head(hidden[rows, src]).double()
    logits[:, mask_id] = -math.inf  # the mask token is never a valid prediction (DESIGN §1)
    ce = F.cross_entropy(logits, x0[rows, cols], reduction="sum")
    return ce / u if weighted else ce


@torch.no_grad()
def diffusion_nelbo(model, x0: torch.Tensor, block_size: int, ts: list[float], mask_id: int, shift: bool,
                    generator: torch.Generator | None = None) -> tuple[float, int]:
    """(NELBO summed over eligible tokens and averaged over the t grid, number of eligible tokens)."""
    b, L = x0.shape
    n = b * int(eligible_positions(L, shift).sum())
    total = 0.0
    for t in ts:
        masks = draw_masks((b, L), block_size, t, shift, generator)
        total += float(masked_loss_sum(model, x0, masks, block_size, mask_rate(t, block_size), mask_id, shift))
    return total / len(ts), n


@torch.no_grad()
def ar_nll(model, x0: torch.Tensor) -> tuple[float, int]:
    """(next-token NLL summed over tokens 1..L-1 under causal attention, number of scored tokens)."""
    b, L = x0.shape
    dev = model.device
    pos = torch.arange(L, device=dev)
    logits = model(x0.to(dev), pos[None].expand(b, L), block_causal_mask(pos, pos, 1)[None, None])
    logits = logits[:, :-1].double()
    mask_id = model.config.mask_token_id
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits[..., mask_id] = -math.inf
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0[:, 1:].to(dev).reshape(-1), reduction="sum")
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
                        batch_size: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Per-token NELBO (diffusion, fixed t grid) and AR NLL over `rows`, with perplexities."""
    from tqdm import tqdm

    cfg = model.config
    B = block_size or cfg.block_size
    if cfg.mask_token_id is None:
        raise ConfigError("this checkpoint has no mask token, so it has no diffusion likelihood; "
                          "run `diffcoder convert` on it first")
    ts = t_grid(t_points)
    gen = torch.Generator().manual_seed(seed)
    nelbo = nll = 0.0
    n_d = n_a = 0
    for i in tqdm(range(0, len(rows), batch_size), desc="likelihood", disable=not progress):
        x0 = rows[i : i + batch_size]
        s, n = diffusion_nelbo(model, x0, B, ts, cfg.mask_token_id, cfg.shift, gen)
        nelbo, n_d = nelbo + s, n_d + n
        s, n = ar_nll(model, x0)
        nll, n_a = nll + s, n_a + n
    return {
        "nelbo_per_token": nelbo / n_d, "ar_nll_per_token": nll / n_a,
        "nelbo_perplexity_bound": math.exp(nelbo / n_d), "ar_perplexity": math.exp(nll / n_a),
        "tokens": int(rows.numel()), "rows": len(rows), "seq_len": rows.shape[1], "block_size": B,
        "shift": cfg.shift, "t_grid": ts, "seed": seed,
    }
