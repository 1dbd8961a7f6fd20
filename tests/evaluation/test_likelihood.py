"""The NELBO of DESIGN §3 checked directly: against the AR NLL at B=1/t=1, against independent per-block
forwards, and the noise (clipped rate, at least one mask per block)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffcoder.evaluation.likelihood import (
    ar_nll,
    diffusion_nelbo,
    draw_masks,
    eligible_positions,
    evaluate_likelihood,
    load_token_sequences,
    mask_rate,
    masked_loss_sum,
    t_grid,
)
from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model, tiny_tokenizer, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _x0(b: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 384, (b, L), generator=g)  # ordinary tokens (ids 0-3 are special)


@pytest.mark.parametrize("L", [9, 16])
def test_nelbo_at_block_1_and_t_1_is_the_ar_nll(L):
    model = tiny_model(seed=3, dtype=torch.float64, std=0.3, shift=True, block_size=1)
    x0 = _x0(3, L)
    nelbo, n = diffusion_nelbo(model, x0, block_size=1, ts=[1.0], mask_id=3, shift=True)
    nll, m = ar_nll(model, x0)
    assert n == m == 3 * (L - 1)
    assert nelbo == pytest.approx(nll, rel=1e-10)


def _brute_force_loss(model, x0, masks, B, u, mask_id, shift):
    """Each block on its own: clean earlier blocks + this noisy block, block-causal attention, no 2L trick."""
    b, L = x0.shape
    total = torch.zeros((), dtype=torch.float64)
    xt = torch.where(masks, torch.full_like(x0, mask_id), x0)
    for s in range(0, L, B):
        e = min(s + B, L)
        seq = torch.cat([x0[:, :s], xt[:, s:e]], dim=1)
        pos = torch.arange(e)
        logits = model(seq, pos[None].expand(b, e), block_causal_mask(pos, pos, B)[None, None]).double()
        logits[..., mask_id] = -math.inf
        for r in range(b):
            for c in range(s, e):
                if masks[r, c]:
                    src = c - 1 if shift else c
                    total = total + F.cross_entropy(logits[r, src][None], x0[r, c][None], reduction="sum")
    return total / u


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("B,t", [(4, 0.1), (4, 0.6), (3, 0.9), (1, 0.5)])
def test_two_stream_forward_equals_independent_block_problems(shift, B, t):
    model = tiny_model(seed=5, dtype=torch.float64, std=0.3, shift=shift, block_size=B)
    x0 = _x0(2, 14, seed=B)
    masks = draw_masks(tuple(x0.shape), B, t, shift, torch.Generator().manual_seed(7))
    u = mask_rate(t, B)
    fast = masked_loss_sum(model, x0, masks, B, u, 3, shift)
    slow = _brute_force_loss(model, x0, masks, B, u, 3, shift)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-9)


def test_noise_is_block_wise_clipped_and_never_leaves_a_block_empty():
    assert mask_rate(0.01, 4) == 0.25 and mask_rate(0.6, 4) == 0.6 and mask_rate(1.0, 4) == 1.0
    assert t_grid(4) == [0.125, 0.375, 0.625, 0.875]
    g = torch.Generator().manual_seed(0)
    for shift in (False, True):
        m = draw_masks((400, 24), 4, 0.01, shift, g)
        blocks = m.view(400, 6, 4)
        assert bool(blocks.any(-1).all())  # at least one masked token in every block
        if shift:
            assert not bool(m[:, 0].any())  # token 0 carries no loss under shift, so it is never masked
    m = draw_masks((2000, 40), 4, 0.6, False, g)
    assert float(m.double().mean()) == pytest.approx(0.6, abs=0.01)  # rate u(t) when above 1/B
    assert bool(draw_masks((3, 8), 4, 1.0, False, g).all())
    assert eligible_positions(5, True).tolist() == [False, True, True, True, True]


def test_nelbo_upper_bounds_are_finite_and_respond_to_the_model():
    x0 = _x0(2, 16)
    a = diffusion_nelbo(tiny_model(seed=1, std=0.02), x0, 4, t_grid(4), 3, False, torch.Generator().manual_seed(0))
    b = diffusion_nelbo(tiny_model(seed=1, std=0.5), x0, 4, t_grid(4), 3, False, torch.Generator().manual_seed(0))
    assert a[1] == b[1] == 32
    # a near-uniform model scores about log(vocab) per token (x the 1/u weights); a peaky random one worse
    assert 0.8 * math.log(383) < a[0] / a[1] < 3 * math.log(383)
    assert b[0] / b[1] > a[0] / a[1]


def test_token_sequences_from_files(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "for i in range(10):\n    print(i)\n" * 10}) + "\n")
    rows = load_token_sequences(tmp_path, tok, seq_len=32, max_tokens=10_000)
    assert rows.shape[1] == 32 and rows.shape[0] >= 4 and (rows == tok.eos_token_id).any()
    with pytest.raises(Exception, match="fewer than one row"):
        load_token_sequences(tmp_path / "a.py", tok, seq_len=100_000, max_tokens=10**9)


def test_likelihood_cli_on_a_tiny_checkpoint(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "held.py"
    data.write_text("import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n" * 30)
    out = tmp_path / "lk.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "diffcoder.cli", "eval", "likelihood", "--model", str(ckpt), "--data",
                    str(data), "--seq-len", "32", "--max-tokens", "256", "--t-grid", "4", "--out", str(out)],
                   env=env, check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert r["block_size"] == 4 and r["rows"] == 8 and len(r["t_grid"]) == 4
    assert math.isfinite(r["nelbo_per_token"]) and math.isfinite(r["ar_nll_per_token"])
    assert r["ar_perplexity"] == pytest.approx(math.exp(r["ar_nll_per_token"]))


def test_evaluate_likelihood_is_reproducible():
    model = tiny_model(seed=2)
    rows = _x0(4, 16)
    a = evaluate_likelihood(model, rows, t_points=3, batch_size=2, seed=11, progress=False)
    b = evaluate_likelihood(model, rows, t_points=3, batch_size=2, seed=11, progress=False)
    assert a == b


def test_token_sequences_from_a_training_shard_folder(tmp_path):
    data = pytest.importorskip("diffcoder.training.data")
    tok = tiny_tokenizer()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"m{i}.py").write_text(f"def f{i}(a, b):\n    return a + b * {i}\n" * 6)
    data.build_corpus([str(src)], tok, tmp_path / "shards", val_fraction=0.5)
    rows = load_token_sequences(tmp_path / "shards", tok, seq_len=16, max_tokens=256)
    assert rows.shape[1] == 16 and 1 <= rows.shape[0] <= 16 and rows.dtype == torch.long
