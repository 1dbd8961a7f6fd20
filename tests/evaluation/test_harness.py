"""The harness on a real tiny checkpoint: records, summary figures, resume after a kill, settings checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffcoder import load
from diffcoder.errors import ConfigError
from diffcoder.evaluation.harness import EvalConfig, read_records, run_eval
from diffcoder.testing import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("tasks", "tasks_requested", "samples", "pass_at_k", "passed", "kinds", "generated_tokens",
                 "forwards", "tokens_per_forward", "decoding", "mode", "prompt_style")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffcoder.cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def test_ar_run_records_and_summary(ckpt, tmp_path):
    model, tok = load(ckpt)
    cfg = EvalConfig("humaneval", str(ckpt), limit=3, ar=True, decoding={"max_new_tokens": 8}, batch_size=2)
    s = run_eval(cfg, tmp_path / "run", model=model, tokenizer=tok, progress=False)
    recs = read_records(tmp_path / "run" / "tasks.jsonl")
    assert sorted(r["task_id"] for r in recs) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for r in recs:
        assert set(r) >= {"prompt", "raw_output", "code", "passed", "kind", "tokens", "forwards", "seconds"}
        assert 1 <= r["tokens"] <= 8 and r["forwards"] == r["tokens"]  # AR: one token per forward
        assert r["prompt"].startswith("from typing import List") or r["prompt"].startswith("\n")
    assert s["pass_at_k"] == {"pass@1": 0.0} and s["passed"] == 0
    assert s["tokens_per_forward"] == 1.0
    assert s["generated_tokens"] == sum(r["tokens"] for r in recs)
    assert s["tokens_per_second"] > 0 and s["batch_size"] == 2 and "cpu" in s["device"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["generated_tokens"] == s["generated_tokens"]
    # Rerunning a finished run does no work (no model needed) and gives the same summary.
    again = run_eval(cfg, tmp_path / "run", progress=False)
    assert {k: again[k] for k in DETERMINISTIC} == {k: s[k] for k in DETERMINISTIC}
    # --rescore reruns the tests from the raw outputs: same outcomes when nothing changed, and a record
    # whose code was tampered with is re-derived from its raw output.
    path = tmp_path / "run" / "tasks.jsonl"
    tampered = read_records(path)
    tampered[0].update(code="tampered", kind="passed", passed=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in tampered))
    rescored = run_eval(cfg, tmp_path / "run", progress=False, rescore=True)
    assert {k: rescored[k] for k in DETERMINISTIC} == {k: s[k] for k in DETERMINISTIC}
    assert "tampered" not in path.read_text()
    # Other settings in the same folder are refused rather than mixed in.
    other = EvalConfig("humaneval", str(ckpt), limit=3, ar=False, decoding={"max_new_tokens": 8})
    with pytest.raises(ConfigError, match="other settings"):
        run_eval(other, tmp_path / "run", progress=False)


def test_diffusion_instruct_run(ckpt, tmp_path):
    model, tok = load(ckpt)
    cfg = EvalConfig("humaneval", str(ckpt), prompt_style="instruct", limit=2,
                     decoding={"max_new_tokens": 8, "block_length": 4, "steps": 8}, batch_size=2)
    s = run_eval(cfg, tmp_path / "run", model=model, tokenizer=tok, progress=False)
    recs = read_records(tmp_path / "run" / "tasks.jsonl")
    assert all("<|im_start|>user" in r["prompt"] for r in recs)
    assert s["tasks"] == 2 and s["forwards"] > 0 and s["decoding"]["mode"] == "diffusion"


def _run_and_kill(cmd: list[str], records: Path, timeout: float = 120) -> int:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= 2:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return records.read_text().count("\n") if records.is_file() else 0


def test_killed_run_resumes_to_the_same_summary(ckpt, tmp_path):
    common = ["eval", "humaneval", "--model", str(ckpt), "--limit", "10", "--max-new-tokens", "8",
              "--batch-size", "2", "--workers", "1", "--no-progress"]
    full = tmp_path / "full"
    subprocess.run(_cli(*common, "--out", str(full)), env=_env(), check=True, capture_output=True)
    part = tmp_path / "part"
    cmd = _cli(*common, "--out", str(part))
    lines = _run_and_kill(cmd, part / "tasks.jsonl")
    assert 1 <= lines < 10, f"the kill came too late to test resuming ({lines} records)"
    with open(part / "tasks.jsonl", "a") as f:
        f.write('{"task_id": "HumanEval/9", "sample": 0, "pro')  # a record cut short by the kill
    out = subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
    assert "pass@1" in out.stdout
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert {k: b[k] for k in DETERMINISTIC} == {k: a[k] for k in DETERMINISTIC}
    recs_a = {r["task_id"]: r for r in read_records(full / "tasks.jsonl")}
    recs_b = read_records(part / "tasks.jsonl")
    assert sorted(r["task_id"] for r in recs_b) == sorted(recs_a)  # every task exactly once
    for r in recs_b:
        assert r["raw_output"] == recs_a[r["task_id"]]["raw_output"]


def test_cli_reports_missing_data_with_the_fix(ckpt, tmp_path):
    out = subprocess.run(_cli("eval", "mbpp", "--model", str(ckpt), "--data", str(tmp_path / "nope.json"),
                              "--out", str(tmp_path / "r")), env=_env(), capture_output=True, text=True)
    assert out.returncode == 2
    assert "MBPP data not found" in out.stderr and "--data" in out.stderr and "Traceback" not in out.stderr
