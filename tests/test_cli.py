"""The command line as a user runs it: real subprocesses on a real (tiny) checkpoint."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

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
    (["generate", "x", "--gen-length", "10", "--steps", "10"], "--gen-length (10) must be a positive multiple"),
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


# ------------------------------------------------------------------------------------------ decoding values


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def cli(*args: str) -> subprocess.CompletedProcess:
    """`diffcoder ARGS` in this process (cli.main, the same entry point; no interpreter start-up per call)."""
    from diffcoder.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # --help, --version, argparse errors
            rc = exc.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("flags,needle", [
    (["--block-length", "0"], "--block-length must be a whole number >= 1, got 0"),
    (["--threshold", "0"], "--threshold must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number >= 1"),
    (["--gen-length", "8", "--max-new-tokens", "8"], "give either --gen-length or --max-new-tokens"),
    (["--seed", str(2**64)], "--seed must be a whole number in [0, 2**64)"),
    (["--eos-id", "-5"], "--eos-id must be a token id"),
])
def test_every_decoding_value_is_checked_in_one_line(ckpt, flags, needle):
    r = cli("generate", "def f", "--model", str(ckpt), *flags)
    assert r.returncode == 2 and needle in last_line(r.stderr), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_block_length_given_is_the_block_length_decoded(ckpt):
    """One step per block of 8 over 8 slots: only possible (and only this cheap) with blocks of 8."""
    r = cli("generate", "def add(a, b):", "--model", str(ckpt), "--block-length", "8", "--gen-length", "8",
            "--steps", "1", "--eos-id", "-1", "--stats")
    assert r.returncode == 0, r.stderr
    stats = json.loads(last_line(r.stderr))
    assert stats["settings"]["block_length"] == 8 and stats["generated_tokens"] == 8
    assert stats["forwards"] <= 2  # one block, or two when the prompt's tail shares the first


@pytest.mark.parametrize("flags", [["--block-length", "4"], ["--threshold", "0.9"], ["--show-denoising"],
                                   ["--steps", "8"], ["--remasking", "random"], ["--no-shift"]])
def test_ar_refuses_diffusion_only_flags(ckpt, flags):
    r = cli("generate", "def f", "--model", str(ckpt), "--ar", "--max-new-tokens", "4", *flags)
    assert r.returncode == 2, r.stderr
    line = last_line(r.stderr)
    flag = flags[0].replace("--no-", "--")  # --shift/--no-shift is named --shift
    assert line.startswith("diffcoder: error: AR decoding (--ar)") and flag in line and "drop --ar" in line


def test_eval_ar_refuses_diffusion_only_flags_too(ckpt, tmp_path):
    r = cli("eval", "humaneval", "--model", str(ckpt), "--out", str(tmp_path / "ev"), "--ar", "--threshold", "0.9")
    assert r.returncode == 2 and "--threshold does not apply" in last_line(r.stderr), r.stderr


def test_ar_decodes_with_its_own_flags(ckpt):
    r = cli("generate", "def f", "--model", str(ckpt), "--ar", "--max-new-tokens", "4", "--eos-id", "-1", "--stats")
    assert r.returncode == 0, r.stderr
    assert json.loads(last_line(r.stderr))["generated_tokens"] == 4


def test_sampling_without_seed_is_random_prints_its_seed_and_repeats_with_it(ckpt):
    args = ("generate", "def add(a, b):", "--model", str(ckpt), "--temperature", "3", "--max-new-tokens", "16",
            "--eos-id", "-1")
    runs = [cli(*args) for _ in range(2)]
    seeds = []
    for r in runs:
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stderr.splitlines() if x.startswith("seed: "))
        seeds.append(int(line.split()[1]))
    assert seeds[0] != seeds[1] and runs[0].stdout != runs[1].stdout
    again = cli(*args, "--seed", str(seeds[0]))
    assert again.stdout == runs[0].stdout and "seed: " not in again.stderr
    greedy = cli("generate", "def add(a, b):", "--model", str(ckpt), "--max-new-tokens", "8")
    assert "seed: " not in greedy.stderr


@pytest.mark.parametrize("device,needle", [
    ("cdua", "--device 'cdua' is not a device name; use cpu, cuda, cuda:N or mps"),
    ("cuda", "--device cuda needs a CUDA GPU"),
    ("tpu", "is not a device name"),
])
def test_wrong_device_is_one_clear_line(ckpt, device, needle):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("generate", "def f", "--model", str(ckpt), "--device", device)
    assert r.returncode == 2 and needle in last_line(r.stderr) and "Traceback" not in r.stderr, r.stderr


def test_raw_gguf_without_mask_token_is_told_to_convert(tmp_path):
    from test_formats import write_gguf

    from diffcoder.testing import tiny_model

    write_gguf(tmp_path / "ar.gguf", tiny_model(seed=3))
    r = cli("generate", "def f", "--model", str(tmp_path / "ar.gguf"))
    line = last_line(r.stderr)
    assert r.returncode == 2 and "diffcoder convert" in line and "--ar" in line and "mask_id=" not in line, r.stderr


def test_help_shows_the_defaults_and_version():
    from diffcoder import __version__

    text = cli("generate", "--help").stdout
    for piece in ("(default: 256)", "(default: 0.0)", "(default: low_confidence)", "else 4)",
                  "a fresh one when sampling"):
        assert piece in " ".join(text.split()), piece
    assert "(default: 384)" in " ".join(cli("eval", "humaneval", "--help").stdout.split())
    v = cli("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"diffcoder {__version__}"


SHARED_DECODING_FLAGS = ("--max-new-tokens", "--steps", "--steps-per-block", "--block-length", "--threshold",
                         "--temperature", "--top-k", "--top-p", "--remasking", "--shift", "--no-shift", "--seed")


@pytest.mark.parametrize("command", [["generate"], ["demo"], ["infill"], ["serve"], ["eval", "humaneval"]])
def test_every_decoding_command_spells_the_flags_the_same(command):
    from diffcoder.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[command[1]]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert set(SHARED_DECODING_FLAGS) <= flags, set(SHARED_DECODING_FLAGS) - flags
    args = parser.parse_args([*command, "--max-tokens", "7", *(["--out", "x"] if command[0] == "eval" else [])])
    assert args.max_new_tokens == 7  # the old serve spelling still works, hidden from --help
    assert "--max-tokens" not in sub.format_help()


def test_convert_takes_the_old_block_size_spelling_hidden():
    from diffcoder.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["convert", "a", "b", "--block-size", "8"]).block_size == 8
    assert parser.parse_args(["convert", "a", "b", "--block-length", "2"]).block_size == 2
    assert "--block-size" not in cli("convert", "--help").stdout


# ------------------------------------------------------------------------------------------ data safety


def test_convert_never_replaces_a_folder_it_did_not_create(tmp_path, ckpt):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    r = cli("convert", str(ckpt), str(target))
    assert r.returncode == 2 and str(target) in r.stderr and "--force" in r.stderr and "notes.txt" in r.stderr
    assert (target / "notes.txt").read_text() == "keep me" and not (target / "config.json").exists()
    (tmp_path / "empty").mkdir()
    assert cli("convert", str(ckpt), str(tmp_path / "empty")).returncode == 0  # an empty folder is fine
    r = cli("convert", str(ckpt), str(target), "--force")
    assert r.returncode == 0 and (target / "config.json").is_file() and not (target / "notes.txt").exists()


def test_info_verifies_the_manifest_and_rehash_accepts_an_edit(tmp_path, ckpt):
    import shutil

    path = shutil.copytree(ckpt, tmp_path / "ck")
    assert "verified" in json.loads(cli("info", str(path), "--json").stdout)["manifest"]
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "block_length": 2}))
    r = cli("info", str(path), "--json")
    line = last_line(r.stderr)
    assert r.returncode == 2 and "generation_config.json changed after the checkpoint was saved" in line
    assert f"diffcoder info {path} --rehash" in line
    r = cli("info", str(path), "--json", "--rehash")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation_defaults"]["block_length"] == 2


def test_threshold_none_overrides_the_checkpoints_threshold(tmp_path):
    from diffcoder.checkpoint import rehash_checkpoint

    ck = write_tiny_checkpoint(tmp_path / "thr")
    gen = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(json.dumps(dict(gen, threshold=0.01)))
    rehash_checkpoint(ck)  # an edit on purpose: accept it into the manifest
    common = ["generate", "add two numbers", "--model", str(ck), "--max-new-tokens", "12", "--block-length", "4",
              "--stats", "--eos-id", "-1"]
    parallel = json.loads(run(*common).stderr.strip().splitlines()[-1])
    assert parallel["settings"]["threshold"] == 0.01 and parallel["forwards"] < 12  # the checkpoint's default
    fixed = json.loads(run(*common, "--threshold", "none").stderr.strip().splitlines()[-1])
    assert fixed["settings"].get("threshold") is None and fixed["forwards"] == 12
    bad = run(*common, "--threshold", "high")
    assert bad.returncode == 2 and "'high' is not a number or 'none'" in bad.stderr
