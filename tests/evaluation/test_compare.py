"""`diffcoder compare` over real eval runs of a tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffcoder import load
from diffcoder.errors import ConfigError
from diffcoder.evaluation.compare import compare_runs, format_table
from diffcoder.evaluation.harness import EvalConfig, run_eval
from diffcoder.testing import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_compare_table_and_chart(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    model, tok = load(ckpt)
    runs = []
    for name, ar, dec in [("ar", True, {"max_new_tokens": 8}),
                          ("diff", False, {"max_new_tokens": 8, "block_length": 4, "steps": 4})]:
        cfg = EvalConfig("humaneval", str(ckpt), limit=2, ar=ar, decoding=dec, batch_size=2)
        run_eval(cfg, tmp_path / name, model=model, tokenizer=tok, progress=False)
        runs.append(tmp_path / name)
    rows = compare_runs(runs)
    assert [r["mode"] for r in rows] == ["ar", "diffusion"]
    assert rows[0]["tokens_per_forward"] == 1.0
    assert rows[1]["tokens_per_forward"] > 1.0  # 8 tokens in 4 steps: two tokens per forward
    table = format_table(rows)
    assert table.count("\n") == 3 and "pass@1" in table and "diff" in table
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    png = tmp_path / "chart.png"
    out = subprocess.run([sys.executable, "-m", "diffcoder.cli", "compare", *map(str, runs), "--plot", str(png)],
                         env=env, capture_output=True, text=True, check=True)
    assert "| ar " in out.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="summary.json"):
        compare_runs([tmp_path / "ckpt"])
