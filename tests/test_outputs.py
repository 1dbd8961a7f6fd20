"""No command destroys data it did not create: every writer refuses a non-empty target unless --force, names the
target and the flag, and leaves the user's files as they were. Through the CLI (`cli.main`) on real folders."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from diffcoder.cli import main
from diffcoder.testing import write_tiny_checkpoint


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny")


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def refused(rc: int, err: str, target: Path) -> bool:
    line = err.strip().splitlines()[-1]
    return rc == 2 and str(target) in line and "--force" in line and "Traceback" not in err


def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    return src


def test_data_build_and_sft_refuse_a_users_folder(tmp_path, ckpt):
    out = users_folder(tmp_path / "out")
    src = corpus(tmp_path)
    rc, _, err = cli("data", "build", src, "--out", out, "--tokenizer", ckpt, "--val-fraction", "0")
    assert refused(rc, err, out) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    rc, _, err = cli("data", "sft", src, "--mine", "--out", out, "--tokenizer", ckpt)
    assert refused(rc, err, out) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    rc, _, err = cli("data", "build", src, "--out", out, "--tokenizer", ckpt, "--val-fraction", "0", "--force")
    assert rc == 0 and (out / "index.json").is_file() and (out / "notes.txt").read_text() == "mine", err


def test_merge_refuses_a_users_folder_before_doing_any_work(tmp_path):
    out = users_folder(tmp_path / "merged")
    rc, _, err = cli("merge", tmp_path / "no-adapter-needed", "--out", out)
    assert refused(rc, err, out) and (out / "notes.txt").read_text() == "mine"


def test_eval_out_refuses_a_users_folder_but_resumes_its_own_run(tmp_path, ckpt):
    out = users_folder(tmp_path / "ev")
    args = ("eval", "humaneval", "--model", ckpt, "--limit", "1", "--max-new-tokens", "4", "--no-progress")
    rc, _, err = cli(*args, "--out", out)
    assert refused(rc, err, out) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    own = tmp_path / "own"
    for _ in range(2):  # the second run finds its own folder and resumes it (nothing left to do)
        rc, stdout, err = cli(*args, "--out", own)
        assert rc == 0, err
    assert len((own / "tasks.jsonl").read_text().splitlines()) == 1


def test_likelihood_out_refuses_to_overwrite_a_file(tmp_path, ckpt):
    data = tmp_path / "held.py"
    data.write_text("def f(x):\n    return x + 1\n" * 20)
    res = tmp_path / "result.json"
    res.write_text("my numbers")
    args = ("eval", "likelihood", "--model", ckpt, "--data", data, "--seq-len", "16", "--t-grid", "1",
            "--out", res)
    rc, _, err = cli(*args)
    assert rc == 2 and str(res) in err and "--force" in err and res.read_text() == "my numbers"
    rc, _, err = cli(*args, "--force")
    assert rc == 0 and "nelbo_per_token" in json.loads(res.read_text()), err


def test_plots_redraw_their_own_png_and_keep_anything_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "train", "step": s, "loss": 3.0 - s / 10, "grad_norm": 1.0, "u_max": 1.0, "mask_ratio": 0.5,
             "lr": 1e-4} for s in range(5)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = run / "training.png"
    assert cli("plot", run)[0] == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert cli("plot", run)[0] == 0  # our own plot: redrawn without --force
    photo = tmp_path / "holiday.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"my photo")
    rc, _, err = cli("plot", run, "--out", photo)
    assert rc == 2 and str(photo) in err and "--force" in err and photo.read_bytes().endswith(b"my photo")
    rc, _, err = cli("compare", run, "--plot", photo)
    assert rc == 2 and str(photo) in err and photo.read_bytes().endswith(b"my photo")
    assert cli("plot", run, "--out", photo, "--force")[0] == 0
