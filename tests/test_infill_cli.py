"""`diffcoder infill` as a user runs it: real subprocesses on a real tiny checkpoint with FIM tokens, checked against
`diffcoder.infill` on the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import diffcoder
from diffcoder.cli import main
from diffcoder.errors import DiffcoderError
from diffcoder.infill_commands import split_at_marker
from diffcoder.testing import write_tiny_checkpoint, write_tiny_fim_checkpoint

PREFIX = "def add(a, b):\n    "
SUFFIX = "print(add(1, 2))\n"
FILE = "def add(a, b):\n    <FILL>\nprint(add(1, 2))\n"  # a whole-line marker: its line break goes with it


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "diffcoder.cli", "infill", *args], capture_output=True, text=True,
                          input=input, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_fim_checkpoint(tmp_path_factory.mktemp("m") / "tiny-fim")


@pytest.fixture(scope="module")
def expected(ckpt):
    model, tok = diffcoder.load(ckpt)
    return diffcoder.infill(model, tok, PREFIX, SUFFIX, max_new_tokens=16)


def test_split_at_marker():
    assert split_at_marker(FILE) == (PREFIX, SUFFIX)
    assert split_at_marker("x = <FILL> + 1\n") == ("x = ", " + 1\n")  # inline: replaced exactly
    assert split_at_marker("a\n<FILL>") == ("a\n", "")  # last line, no line break to take
    assert split_at_marker("a\n  ??  \r\nb", "??") == ("a\n  ", "b")
    with pytest.raises(DiffcoderError, match=r"f.py has 0 <FILL> markers; put <FILL> once"):
        split_at_marker("no gap\n", name="f.py")
    with pytest.raises(DiffcoderError, match=r"has 2 <FILL> markers \(lines 1, 3\); keep one"):
        split_at_marker("<FILL>\nx\n<FILL>\n")


def test_marker_file_and_piece_files_print_the_completed_file(ckpt, expected, tmp_path):
    f = tmp_path / "f.py"
    f.write_text(FILE)
    a = run(str(f), "--model", str(ckpt), "--max-new-tokens", "16", "--stats")
    assert a.returncode == 0, a.stderr
    assert a.stdout == expected.text == PREFIX + expected.middle + SUFFIX
    stats = json.loads(a.stderr.strip().splitlines()[-1])
    assert stats["forwards"] == expected.forwards and stats["middle_tokens"] == len(expected.middle_ids)
    (tmp_path / "p.py").write_text(PREFIX)
    b = run("--prefix-file", str(tmp_path / "p.py"), "--suffix-file", "-", "--model", str(ckpt),
            "--max-new-tokens", "16", "--middle-only", "--show-denoising", input=SUFFIX)
    assert b.returncode == 0, b.stderr
    assert b.stdout == expected.middle
    steps = [line for line in b.stderr.splitlines() if line.startswith("step ")]
    assert len(steps) == 16  # one token per step, one line each when not a terminal


def test_another_marker(ckpt, expected, tmp_path, capsys):
    f = tmp_path / "g.py"
    f.write_text(FILE.replace("<FILL>", "# TODO"))
    assert main(["infill", str(f), "--marker", "# TODO", "--model", str(ckpt), "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == expected.text


@pytest.mark.parametrize("content,args,needle", [
    ("no gap here\n", [], "has 0 <FILL> markers"),
    ("<FILL>\n<FILL>\n", [], "has 2 <FILL> markers (lines 1, 2)"),
    (FILE, ["--prefix-file", "x"], "not both"),
    (FILE, ["--marker", ""], "--marker must not be empty"),
    (FILE, ["--max-new-tokens", "16", "--steps", "3"], "--steps (3) must be a positive multiple"),
])
def test_bad_input_is_one_clear_line(ckpt, tmp_path, capsys, content, args, needle):
    f = tmp_path / "f.py"
    f.write_text(content)
    assert main(["infill", str(f), "--model", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_missing_files_and_no_input(ckpt, tmp_path, capsys):
    assert main(["infill", "--model", str(ckpt)]) == 2
    assert "nothing to infill" in capsys.readouterr().err
    assert main(["infill", str(tmp_path / "absent.py"), "--model", str(ckpt)]) == 2
    assert "absent.py does not exist" in capsys.readouterr().err
    assert main(["infill", "--prefix-file", "-", "--suffix-file", "-", "--model", str(ckpt)]) == 2
    assert "only one of" in capsys.readouterr().err


def test_a_checkpoint_without_fim_tokens_names_the_fix(tmp_path, capsys):
    plain = write_tiny_checkpoint(tmp_path / "plain")
    f = tmp_path / "f.py"
    f.write_text(FILE)
    assert main(["infill", str(f), "--model", str(plain), "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffcoder: error: {plain} has no fill-in-the-middle tokens") and err.count("\n") == 1
    assert "--fim-rate 0.5" in err and "diffcoder train" in err
