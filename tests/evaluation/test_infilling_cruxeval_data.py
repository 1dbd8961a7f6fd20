"""The HumanEval-infilling and CRUXEval loaders against their references, through the real sandbox: every canonical
middle passes (all of single-line and random-span-light, an evenly spread sample of the larger splits), every
CRUXEval assertion holds (all 800, both tasks), and empty answers pass none."""

from __future__ import annotations

import pytest

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.benchmarks.humaneval_infilling import SPLITS
from diffcoder.evaluation.data import default_data_dir
from diffcoder.evaluation.harness import select_tasks
from diffcoder.evaluation.sandbox import Limits, Sandbox

HAVE_DATA = (default_data_dir() / "cruxeval.jsonl").is_file()
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="benchmark data not in ../shared/data or $DIFFCODER_DATA")
WORKERS = 4  # the programs mostly wait on process start-up: more workers than cores still helps
# split: (tasks in the file, how many to check; None: all)
INFILLING = {"single-line": (1033, None), "random-span-light": (164, None), "multi-line": (5815, 150),
             "random-span": (1640, 150)}


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout_s=10))


@pytest.fixture(scope="module")
def quick_sandbox() -> Sandbox:
    """For wrong answers, some of which loop forever (an empty middle that held `i += 1`)."""
    return Sandbox(Limits(timeout_s=1.5))


def _failures(sandbox, tasks, programs) -> list:
    results = sandbox.run_many(programs, workers=WORKERS)
    return [(t.task_id, r.kind, r.detail) for t, r in zip(tasks, results) if not r.passed]


@pytest.mark.parametrize("split", list(INFILLING))
def test_every_canonical_middle_passes(sandbox, quick_sandbox, split):
    total, sample = INFILLING[split]
    tasks = load_tasks("humaneval-infilling", None, split)
    assert len(tasks) == total and len({t.task_id for t in tasks}) == total
    tasks = select_tasks(tasks, None, sample)
    assert not _failures(sandbox, tasks, [t.reference_program() for t in tasks])
    for t in tasks[:3]:  # prefix + middle + suffix is the whole solution, in both styles
        assert t.reference_program().code == t.prompt + t.reference + t.suffix
        assert t.program(t.reference, "fim") == t.reference_program()
    # An empty middle passes none (a sample: the gap holds code the tests need)
    empty = tasks[:: max(1, len(tasks) // 40)]
    results = quick_sandbox.run_many([t.program("", "fim") for t in empty], workers=WORKERS)
    assert sum(r.passed for r in results) <= len(empty) // 20  # a few gaps hold only a redundant line


@pytest.mark.parametrize("task", ["output", "input"])
def test_every_cruxeval_assertion_holds(sandbox, task):
    tasks = load_tasks("cruxeval", None, task)
    assert len(tasks) == 800
    assert not _failures(sandbox, tasks, [t.reference_program() for t in tasks])
    wrong = tasks[::40]
    if task == "output":  # another task's output is the wrong answer (skip the rare coincidences)
        programs = [t.program(tasks[(i + 1) % 800].output, "base") for i, t in enumerate(wrong)
                    if tasks[(i + 1) % 800].output != t.output]
    else:
        programs = [t.program("", "base") for t in wrong]
    assert sum(r.passed for r in sandbox.run_many(programs, workers=WORKERS)) == 0


def test_cruxeval_prompts_and_predictions():
    out = load_tasks("cruxeval/output")[0]
    assert out.prompt.endswith(f"{out.code}\nassert f({out.input}) ==") and out.task_id == "CRUXEval-O/sample_0"
    assert out.completion_code(" [1, 2]\nassert f(3) == 4\n", "base") == "[1, 2]"  # the model's line only
    assert out.program("f([1])", "base").code.count("def f(") == 0  # -O: a value, never a call of f
    inp = load_tasks("cruxeval/input")[0]
    assert inp.prompt.endswith(f"{inp.code}\nassert {inp.output} == f(") and inp.task_id == "CRUXEval-I/sample_0"
    assert inp.completion_code("[1, 1, 3, 1, 3, 1])\n\ndef g", "base") == "[1, 1, 3, 1, 3, 1]"
    assert inp.program(inp.completion_code(f"{inp.input})\n", "base"), "base") == inp.reference_program()
    # The expected value stays on the trusted side: the program never holds the output literal (-I)
    assert inp.output not in inp.reference_program().code


def test_prefix_only_cuts_where_the_suffix_begins():
    task = next(t for t in load_tasks("humaneval-infilling/single-line") if t.task_id.endswith("/0/L3"))
    head = task.suffix_head()
    assert head and task.suffix.startswith(head) and "\n" not in head.strip("\n")
    # A left-to-right model that writes the missing line and carries on into the suffix is cut before the suffix
    raw = "\n" + task.reference + task.suffix + "\ndef other():\n"
    code = task.completion_code(raw, "prefix-only")
    assert task.program(code, "prefix-only").code == task.prompt.rstrip() + "\n" + task.reference + task.suffix
    assert task.fim_suffix("prefix-only") is None and task.fim_suffix("fim") == task.suffix
    assert task.stop_strings("fim") == []


def test_bad_split_or_task_names_the_choices():
    with pytest.raises(ConfigError, match=r"--split with one of single-line, multi-line.*got 'singleline'"):
        load_tasks("humaneval-infilling", None, "singleline")
    with pytest.raises(ConfigError, match=r"--task with one of output, input \(none given\)"):
        load_tasks("cruxeval")
    with pytest.raises(ConfigError, match="unknown benchmark 'crux'"):
        load_tasks("crux")


def test_missing_infilling_or_cruxeval_file_names_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODER_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"{SPLITS['multi-line']}.*human-eval-infilling.*--data.*DIFFCODER_DATA"):
        load_tasks("humaneval-infilling/multi-line")
    with pytest.raises(ConfigError, match=r"CRUXEval data not found at .*cruxeval\.jsonl.*--data"):
        load_tasks("cruxeval/input", tmp_path / "elsewhere.jsonl")
    bad = tmp_path / "cruxeval.jsonl"
    bad.write_text('{"code": "def f(): pass"}\n')
    with pytest.raises(ConfigError, match="line 1 is not a CRUXEval record"):
        load_tasks("cruxeval/output")
