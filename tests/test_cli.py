"""The command line as a user runs it: real subprocesses on a real (tiny) checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffcoder.testing import write_tiny_checkpoint


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "diffcoder.cli", *args], capture_output=True, text=True,
                          input=input, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")


def test_generate_from_argument_and_stdin(ckpt):
    a = run("generate", "def add(a, b):", "--model", str(ckpt), "--gen-length", "8", "--steps", "8")
    assert a.returncode == 0, a.stderr
    b = run("generate", "--model", str(ckpt), "--gen-length", "8", "--steps", "8", input="def add(a, b):")
    assert b.returncode == 0 and b.stdout == a.stdout


def test_generate_chat_with_denoising_view_and_stats(ckpt):
    r = run("generate", "add two numbers", "--chat", "--model", str(ckpt), "--max-new-tokens", "12",
            "--block-length", "4", "--show-denoising", "--stats", "--eos-id", "-1")
    assert r.returncode == 0, r.stderr
    steps = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert len(steps) == 12  # one token per step by default, one line each when not a terminal
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] == 12 and stats["forwards"] == 12


def test_info(ckpt):
    r = run("info", str(ckpt), "--json")
    info = json.loads(r.stdout)
    assert (info["mask_token_id"], info["block_size"], info["shift"], info["vocab_size"]) == (3, 4, False, 384)


@pytest.mark.parametrize("args,needle", [
    (["generate", "x", "--gen-length", "10", "--steps", "10"], "gen_length (10) must be a positive multiple"),
    (["generate", "x", "--gen-length", "8", "--steps", "3"], "try steps=2 or 4"),
    (["generate", "x", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["generate", "   "], "empty prompt"),
])
def test_bad_input_is_one_clear_line(ckpt, args, needle):
    r = run(*args, "--model", str(ckpt))
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_missing_model_path():
    r = run("generate", "x", "--model", "/nonexistent/model")
    assert r.returncode == 2 and "neither a path nor a built-in name" in r.stderr and "Traceback" not in r.stderr


def test_convert_cli(tmp_path, ckpt):
    r = run("convert", str(ckpt), str(tmp_path / "out"), "--block-size", "8")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["block_size"] == 8 and cfg["mask_token_id"] == 3


def test_threshold_none_overrides_the_checkpoints_threshold(tmp_path):
    ck = write_tiny_checkpoint(tmp_path / "thr")
    gen = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(json.dumps(dict(gen, threshold=0.01)))
    common = ["generate", "add two numbers", "--model", str(ck), "--max-new-tokens", "12", "--block-length", "4",
              "--stats", "--eos-id", "-1"]
    parallel = json.loads(run(*common).stderr.strip().splitlines()[-1])
    assert parallel["settings"]["threshold"] == 0.01 and parallel["forwards"] < 12  # the checkpoint's default
    fixed = json.loads(run(*common, "--threshold", "none").stderr.strip().splitlines()[-1])
    assert fixed["settings"].get("threshold") is None and fixed["forwards"] == 12
    bad = run(*common, "--threshold", "high")
    assert bad.returncode == 2 and "'high' is not a number or 'none'" in bad.stderr
