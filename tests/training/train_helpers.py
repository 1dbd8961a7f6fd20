"""Shared helpers of the training tests (a uniquely named module: conftest modules are not importable)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def make_code_corpus(root: Path, n: int = 60, seed: int = 0) -> Path:
    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"def f{j}(x):\n    return x + {r.randint(0, 99)}\n" for j in range(r.randint(1, 8)))
        (root / f"m{i}.py").write_text(body)
    return root


def base_overrides(setup, out: Path, **extra) -> list[str]:
    ov = {
        "model.path": setup["base"], "data.path": setup["data"], "data.seq_len": 32, "train.steps": 8,
        "train.out_dir": out, "train.micro_batch_size": 4, "objective.warmup_steps": 3, "optim.lr": 1e-3,
        "train.eval_batches": 2,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def run_cli(args: list[str], env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", **(env_extra or {}))
    p = subprocess.run([sys.executable, "-m", "diffcoder.cli", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p
