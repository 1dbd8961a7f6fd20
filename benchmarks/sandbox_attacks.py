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

from conftest import HostState  # noqa: E402
from test_attacks import ATTACKS, GENUINE, HEAD  # noqa: E402

from diffcoder.evaluation.data import load_tasks  # noqa: E402
from diffcoder.evaluation.sandbox import Limits, Sandbox  # noqa: E402

ESCAPES = {"child_leaves_the_process_group", "nested_user_namespace_tmpfs", "memfd_beyond_the_memory_limit"}
PROC = ("proc_snoop", "import os\nseen = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "assert len(seen) <= 2, f'{len(seen)} processes visible'\n", "passed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fallback", action="store_true", help="without bubblewrap (the fallback mode)")
    args = p.parse_args()
    if args.fallback:
        os.environ["PATH"] = tempfile.mkdtemp()  # no bwrap to be found
    sandbox = Sandbox(Limits(timeout_s=6, cpu_s=1))
    task = load_tasks("humaneval")[0]
    rows = [("genuine", HEAD + GENUINE, "passed"), *((n, HEAD + code, kind) for n, (code, kind) in ATTACKS.items())]
    print(f"mode: {sandbox.containment.mode}; " + "; ".join(sandbox.isolation()) + "\n")
    print("| attack | expected | recorded | scored correctly | left on the host |")
    print("| --- | --- | --- | --- | --- |")
    correct = 0
    for name, code, expected in [*rows, PROC]:
        before = HostState()
        program = task.program(code, "instruct") if name != "proc_snoop" else code
        r = sandbox.run(program)
        left = before.leftovers()
        ok = r.kind == expected and (r.passed == (expected == "passed"))
        correct += ok
        kind = r.kind + (f" ({r.detail[:60]})" if not ok else "")
        print(f"| {name}{' (escape)' if name in ESCAPES or name == 'proc_snoop' else ''} | {expected} | {kind} | "
              f"{'yes' if ok else '**no**'} | {', '.join(left) or 'nothing'} |")
    print(f"\n{correct} of {len(rows) + 1} scored correctly")


if __name__ == "__main__":
    main()
