"""Issue 10's attack table: every attack of tests/evaluation/test_attacks.py (and the containment programs of
test_sandbox.py's escapes) run through `Task.program` → `Sandbox.run`, with bubblewrap and in the fallback,
each checked for the kind recorded and for what it left on the host. Prints a Markdown table.

    .venv/bin/python benchmarks/sandbox_attacks.py [--fallback]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "evaluation"))

from hostcheck import HostState  # noqa: E402
from test_attacks import ATTACKS, GENUINE, HEAD  # noqa: E402

from diffcoder.evaluation.benchmarks import load_tasks  # noqa: E402
from diffcoder.evaluation.data import default_data_dir  # noqa: E402
from diffcoder.evaluation.sandbox import Limits, Sandbox  # noqa: E402

ESCAPES = {"child_leaves_the_process_group", "nested_user_namespace_tmpfs", "memfd_beyond_the_memory_limit",
           "sees_only_its_own_processes"}


def extra_rows() -> list[tuple[str, object, str]]:
    """The attacks that need other tasks than HumanEval/0 (as in test_attacks.py), and the /proc check."""
    rows = [("sees_only_its_own_processes", "import os\nseen = [p for p in os.listdir('/proc') if p.isdigit()]\n"
             "assert len(seen) <= 2, f'{len(seen)} processes visible'\n", "passed")]
    he2 = load_tasks("humaneval")[2]
    rows.append(("redefines_the_test_s_abs (HumanEval/2)", he2.program(
        "import builtins\nbuiltins.abs = abs = lambda x: 0\ndef truncate_number(number):\n    return 0.5\n",
        "instruct"), "wrong_answer"))
    if (default_data_dir() / "sanitized-mbpp.json").is_file():
        mb = {t.task_id: t for t in load_tasks("mbpp")}["Mbpp/596"]
        rows.append(("fake_sys_module (Mbpp/596)", mb.program(
            "class sys:\n    getsizeof = staticmethod(lambda x: 0)\ndef tuple_size(t):\n    return 0\n",
            "instruct"), "wrong_answer"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fallback", action="store_true", help="without bubblewrap (the fallback mode)")
    args = p.parse_args()
    if args.fallback:
        os.environ["PATH"] = tempfile.mkdtemp()  # no bwrap to be found
    sandbox = Sandbox(Limits(timeout_s=6, cpu_s=1))
    task = load_tasks("humaneval")[0]
    rows = [("genuine", HEAD + GENUINE, "passed"), *((n, HEAD + code, kind) for n, (code, kind) in ATTACKS.items())]
    rows = [(n, task.program(code, "instruct"), kind) for n, code, kind in rows] + extra_rows()
    print(f"mode: {sandbox.containment.mode}; " + "; ".join(sandbox.isolation()) + "\n")
    print("| attack | expected | recorded | scored correctly | left on the host |")
    print("| --- | --- | --- | --- | --- |")
    correct = 0
    for name, program, expected in rows:
        before = HostState()
        r = sandbox.run(program)
        left = before.leftovers()
        ok = r.kind == expected and (r.passed == (expected == "passed"))
        correct += ok
        kind = r.kind + (f" ({r.detail[:60]})" if not ok else "")
        print(f"| {name}{' (escape)' if name in ESCAPES else ''} | {expected} | {kind} | "
              f"{'yes' if ok else '**no**'} | {', '.join(left) or 'nothing'} |")
    print(f"\n{correct} of {len(rows)} scored correctly")


if __name__ == "__main__":
    main()
