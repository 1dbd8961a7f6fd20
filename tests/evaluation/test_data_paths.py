"""Where benchmark data comes from: --data, then $DIFFCODER_DATA, then (source checkouts only) ../shared/data."""

from __future__ import annotations

import json

import pytest

from diffcoder.errors import ConfigError
from diffcoder.evaluation import data
from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.benchmarks.mbpp import mbpp_path
from diffcoder.evaluation.data import MBPP_FILE, default_data_dir


def _mbpp_file(folder, task_id: int = 7):
    folder.mkdir(parents=True, exist_ok=True)
    row = {"task_id": task_id, "prompt": "Add one.", "code": "def inc(x):\n    return x + 1\n", "test_imports": [],
           "test_list": ["assert inc(1) == 2"]}
    (folder / MBPP_FILE).write_text(json.dumps([row]))
    return folder / MBPP_FILE


def test_data_flag_wins_over_the_environment(tmp_path, monkeypatch):
    _mbpp_file(tmp_path / "env", 1)
    monkeypatch.setenv("DIFFCODER_DATA", str(tmp_path / "env"))
    assert [t.task_id for t in load_tasks("mbpp")] == ["Mbpp/1"]
    flag = _mbpp_file(tmp_path / "flag", 2)
    assert [t.task_id for t in load_tasks("mbpp", tmp_path / "flag")] == ["Mbpp/2"]  # a folder ...
    assert [t.task_id for t in load_tasks("mbpp", flag)] == ["Mbpp/2"]  # ... or the file itself


def test_source_checkout_falls_back_to_shared_data(monkeypatch):
    monkeypatch.delenv("DIFFCODER_DATA", raising=False)
    root = data.source_checkout()
    assert root is not None and (root / "pyproject.toml").is_file()  # the tests run from a checkout
    assert default_data_dir() == root.parent / "shared" / "data"


def test_installed_package_without_data_says_to_pass_data(monkeypatch):
    """An installed wheel has no repository around it: no silent guess, an error naming both fixes."""
    monkeypatch.delenv("DIFFCODER_DATA", raising=False)
    monkeypatch.setattr(data, "source_checkout", lambda: None)
    with pytest.raises(ConfigError, match=r"--data.*DIFFCODER_DATA"):
        default_data_dir()
    with pytest.raises(ConfigError, match=r"--data.*DIFFCODER_DATA"):
        load_tasks("mbpp")


def test_missing_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODER_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"MBPP data not found at {tmp_path}/{MBPP_FILE}.*--data.*DIFFCODER_DATA"):
        mbpp_path()
    with pytest.raises(ConfigError, match=r"nope\.json.*from --data"):
        load_tasks("mbpp", tmp_path / "nope.json")
