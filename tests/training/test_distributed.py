"""FSDP2 under torchrun with 2 CPU processes (gloo) against the single-process run, and a distributed resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import SRC, base_overrides, run_cli

import diffcoder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], env_extra: dict | None = None, check: bool = True) -> None:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "diffcoder.cli", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_fsdp_two_gloo_ranks_match_single_process(tiny_setup, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  log_every: 1\n")
    common = {"train.steps": 6, "train.save_every": 3, "train.eval_every": 3}
    # 2 ranks x micro-batch 2 == 1 rank x micro-batch 4: the same global batch, rows and masks. The 2-rank run
    # is SIGKILLed (rank 0) right after publishing its step-3 checkpoint and resumed from it.
    dp2 = base_overrides(tiny_setup, tmp_path / "dp2", **common, **{"train.micro_batch_size": 2})
    torchrun(["train", str(recipe), *dp2, "--quiet"], {"DIFFCODER_KILL_AT": "save-after-rename:1"}, check=False)
    assert (tmp_path / "dp2" / "checkpoints" / "step_0000003" / "dcp").is_dir()
    assert not (tmp_path / "dp2" / "final").exists()
    torchrun(["train", str(recipe), *dp2, "--resume", "--quiet"])
    run_cli(["train", str(recipe), *base_overrides(tiny_setup, tmp_path / "dp1", **common,
                                                    **{"train.micro_batch_size": 4}), "--quiet"])
    a, b = records(tmp_path / "dp1"), records(tmp_path / "dp2")
    assert [r["kind"] for r in a] == [r["kind"] for r in b] and len(a) == 9
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "eval_nelbo", "eval_ar_nll"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5), (k, x, y)
    ck = tmp_path / "dp2" / "checkpoints" / "step_0000006"
    assert (ck / "dcp").is_dir() and (ck / "model.safetensors").is_file()
    m2, _ = diffcoder.load(tmp_path / "dp2" / "final")
    m1, _ = diffcoder.load(tmp_path / "dp1" / "final")
    import torch

    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(p1, p2, atol=1e-5), n
