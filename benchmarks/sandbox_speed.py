"""Wall time of a full reference-solution run through the sandbox (HumanEval 164 or MBPP 427 programs).

Uses only what every version of the sandbox offers (`load_tasks`, `reference_program`, `Sandbox.run_many`),
so the same command times another checkout: PYTHONPATH=OTHER/src .venv/bin/python benchmarks/sandbox_speed.py

    .venv/bin/python benchmarks/sandbox_speed.py --benchmark humaneval --workers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import time

from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.sandbox import Limits, Sandbox


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="humaneval", choices=["humaneval", "mbpp"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    tasks = load_tasks(args.benchmark)
    sandbox = Sandbox(Limits(timeout_s=10))
    sandbox.run("pass")  # probes and warms up outside the timing
    programs = [t.reference_program() for t in tasks]
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        results = sandbox.run_many(programs, workers=args.workers)
        seconds = time.perf_counter() - t0
        print(f"{args.benchmark}: {sum(r.passed for r in results)}/{len(results)} passed in {seconds:.2f} s "
              f"({args.workers} workers, load average {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
