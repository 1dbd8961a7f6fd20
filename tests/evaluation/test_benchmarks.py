"""Reference solutions pass all tasks and empty completions pass none, through the real sandbox."""

from __future__ import annotations

from collections import Counter

import pytest

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.benchmarks.mbpp import mbpp_path
from diffcoder.evaluation.data import default_data_dir
from diffcoder.evaluation.sandbox import Limits, Sandbox

HAVE_MBPP = (default_data_dir() / "sanitized-mbpp.json").is_file()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout_s=10))


def test_humaneval_canonical_solutions_pass_all_and_empty_pass_none(sandbox):
    tasks = load_tasks("humaneval")
    assert len(tasks) == 164
    results = sandbox.run_many([t.reference_program() for t in tasks], workers=2)
    failed = [(t.task_id, r.kind, r.detail) for t, r in zip(tasks, results) if not r.passed]
    assert not failed and sum(r.passed for r in results) == 164
    empty = sandbox.run_many([t.program("", "base") for t in tasks], workers=2)
    assert sum(r.passed for r in empty) == 0
    assert Counter(r.kind for r in empty).keys() <= {"wrong_answer", "runtime_error"}


@pytest.mark.skipif(not HAVE_MBPP, reason="sanitized-mbpp.json not in ../shared/data or $DIFFCODER_DATA")
def test_mbpp_reference_solutions_pass_all_and_empty_pass_none(sandbox):
    tasks = load_tasks("mbpp")
    assert len(tasks) == 427
    results = sandbox.run_many([t.reference_program() for t in tasks], workers=2)
    failed = [(t.task_id, r.kind, r.detail) for t, r in zip(tasks, results) if not r.passed]
    assert not failed and sum(r.passed for r in results) == 427
    empty = sandbox.run_many([t.program("", s) for t in tasks for s in ("base", "instruct")][::7], workers=2)
    assert sum(r.passed for r in empty) == 0


def test_prompts_follow_the_customary_formats():
    he = load_tasks("humaneval")[0]
    assert he.prompt.startswith("from typing import List") and he.entry_point == "has_close_elements"
    assert he.solution_prefix.startswith("from typing import List")
    # An instruct answer that restates the whole function runs as is (after the prompt's imports) ...
    full = he.reference_program()
    answer = he.prompt + he.reference
    assert he.program(answer, "instruct").code.count("def has_close_elements") == 1
    # ... and one that gives only the body continues the prompt.
    assert he.program(he.reference, "instruct") == full
    # Base runs feed the prompt without its trailing newline; the completion brings the line break back.
    assert he.base_prompt == he.prompt.rstrip() and not he.base_prompt.endswith("\n")
    assert he.program("\n" + he.reference, "base").code == full.code.replace(he.prompt, he.base_prompt + "\n", 1)
    # The test stays on the trusted side: the program's code holds none of it; the prompt is the test's context
    # (its helpers), and the test takes only the entry point from the program.
    assert full.test == f"{he.test}\n\ncheck(has_close_elements)\n" and he.test not in full.code
    assert full.context == he.prompt and full.names() == ("has_close_elements",)
    if HAVE_MBPP:
        mbpp = {t.task_id: t for t in load_tasks("mbpp")}
        mb = mbpp["Mbpp/2"]
        first_test = mb.test.splitlines()[0]
        assert first_test in mb.prompt and first_test in mb.instruction  # one test shown
        assert mb.entry_point == "similar_elements" and mb.program("x", "instruct").names() == ("similar_elements",)
        # A test that uses a module the reference imported but the test did not (Mbpp/596 uses `sys`) takes it
        # from the program by name; the checker then imports its own copy. Builtins stay the checker's, unless
        # the entry point itself is named like one (Mbpp/126 defines `sum`).
        assert mbpp["Mbpp/596"].reference_program().names() == ("sys", "tuple_size")
        assert mbpp["Mbpp/126"].reference_program().names() == ("sum",)


def test_missing_mbpp_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODER_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match="sanitized-mbpp.json.*DIFFCODER_DATA"):
        mbpp_path()
    with pytest.raises(ConfigError, match="--data"):
        load_tasks("mbpp", tmp_path / "nope.json")
