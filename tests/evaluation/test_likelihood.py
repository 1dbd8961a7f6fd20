"""The held-out NELBO (docs/design.md §3.6) checked directly: against the AR NLL at B=1/t=1, against independent
per-block forwards, and the grid noise (clipped rate, at least one mask per block)."""

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

from diffcoder.evaluation.likelihood import ar_nll, evaluate_likelihood, load_token_sequences
from diffcoder.masks import block_causal_mask
from diffcoder.nelbo import (
    clip_block_rate,
    diffusion_nelbo,
    grid_noise,
    nelbo_loss_sum,
    shift_eligible,
    t_grid,
)
from diffcoder.testing import tiny_model, tiny_tokenizer, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _x0(b: int, L: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 384, (b, L), generator=g)  # ordinary tokens (ids 0-3 are special)


def _eligible(b: int, L: int, shift: bool) -> torch.Tensor:
    return shift_eligible(torch.ones(b, L, dtype=torch.bool), shift)


def _scorer(model, B: int, shift: bool):
    return lambda x0, noise: nelbo_loss_sum(model, x0, noise, B, shift, 3)


@pytest.mark.parametrize("L", [9, 16])
def test_nelbo_at_block_1_and_t_1_is_the_ar_nll(L):
    model = tiny_model(seed=3, dtype=torch.float64, std=0.3, shift=True, block_size=1)
    x0 = _x0(3, L)
    noise = grid_noise(_eligible(3, L, True), 1, 1.0, 0)
    nelbo = float(nelbo_loss_sum(model, x0, noise, 1, True, 3))
    nll, m = ar_nll(model, x0)
    assert int(noise.masked.sum()) == m == 3 * (L - 1)
    assert nelbo == pytest.approx(nll, rel=1e-10)


def _brute_force_loss(model, x0, masks, weight, B, mask_id, shift):
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
                    ce = F.cross_entropy(logits[r, src][None], x0[r, c][None], reduction="sum")
                    total = total + ce * float(weight[r, c])
    return total


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("B,t", [(4, 0.1), (4, 0.6), (3, 0.9), (1, 0.5)])
def test_two_stream_forward_equals_independent_block_problems(shift, B, t):
    model = tiny_model(seed=5, dtype=torch.float64, std=0.3, shift=shift, block_size=B)
    L = 12 if B != 1 else 14
    x0 = _x0(2, L, seed=B)
    noise = grid_noise(_eligible(2, L, shift), B, t, 0, seed=7)
    assert torch.all(noise.weight[noise.masked] == 1 / max(t, 1 / B))  # w = 1/u, u the clipped rate
    fast = nelbo_loss_sum(model, x0, noise, B, shift, 3)
    slow = _brute_force_loss(model, x0, noise.masked, noise.weight, B, 3, shift)
    assert float(fast) == pytest.approx(float(slow), rel=1e-9)


def test_grid_noise_is_block_wise_clipped_and_never_leaves_a_block_empty():
    assert clip_block_rate(torch.tensor([0.01, 0.6, 1.0]), 4).tolist() == pytest.approx([0.25, 0.6, 1.0])
    assert t_grid(4) == [0.125, 0.375, 0.625, 0.875]
    for shift in (False, True):
        m = grid_noise(_eligible(400, 24, shift), 4, 0.01, 0).masked
        assert bool(m.view(400, 6, 4).any(-1).all())  # at least one masked token in every block
        if shift:
            assert not bool(m[:, 0].any())  # token 0 carries no loss under shift, so it is never masked
    m = grid_noise(_eligible(2000, 40, False), 4, 0.6, 1).masked
    assert float(m.double().mean()) == pytest.approx(0.6, abs=0.01)  # rate u(t) when above 1/B
    assert bool(grid_noise(_eligible(3, 8, False), 4, 1.0, 2).masked.all())
    e = _eligible(5, 16, False)
    assert torch.equal(grid_noise(e, 4, 0.5, 3).masked, grid_noise(e, 4, 0.5, 3).masked)  # a fixed draw


def test_nelbo_does_not_depend_on_the_batch_split():
    model = tiny_model(seed=2, dtype=torch.float64, std=0.3)
    x0 = _x0(6, 16)
    e = torch.ones_like(x0, dtype=torch.bool)
    one = diffusion_nelbo(_scorer(model, 4, False), x0, e, 4, False, 3, batch_size=6)
    three = diffusion_nelbo(_scorer(model, 4, False), x0, e, 4, False, 3, batch_size=2)
    assert one[1] == three[1] == 96
    assert float(one[0]) == pytest.approx(float(three[0]), rel=1e-12)


def test_nelbo_upper_bounds_are_finite_and_respond_to_the_model():
    x0 = _x0(2, 16)
    e = torch.ones_like(x0, dtype=torch.bool)
    a = diffusion_nelbo(_scorer(tiny_model(seed=1, std=0.02), 4, False), x0, e, 4, False, 4, 2)
    b = diffusion_nelbo(_scorer(tiny_model(seed=1, std=0.5), 4, False), x0, e, 4, False, 4, 2)
    assert a[1] == b[1] == 32
    # a near-uniform model scores about log(vocab) per token (x the 1/u weights); a peaky random one worse
    assert 0.8 * math.log(383) < float(a[0]) / a[1] < 3 * math.log(383)
    assert float(b[0]) / b[1] > float(a[0]) / a[1]


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
