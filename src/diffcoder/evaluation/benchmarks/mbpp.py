"""MBPP, sanitized split (427 tasks): write a function from a one-line description and one of its tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks.base import Task
from diffcoder.evaluation.extract import MBPP_STOPS, cut_at_stops, extract_code, trim_incomplete
from diffcoder.evaluation.sandbox import Program

MBPP_FILE = "sanitized-mbpp.json"


@dataclass
class MbppTask(Task):
    test: str = ""  # the task's assertions (after its test imports)

    styles: ClassVar[tuple[str, ...]] = ("base", "instruct")

    def program(self, code: str, style: str) -> Program:
        prefix = self.prompt_text("base") if style == "base" else ""
        return Program(f"{prefix}{code}", self.test, "", self.entry_point)

    def reference_program(self) -> Program:
        return self.program(self.reference, "instruct")

    def completion_code(self, raw: str, style: str) -> str:
        if style == "base":
            return trim_incomplete(cut_at_stops(raw, self.stops))
        return trim_incomplete(extract_code(raw, self.entry_point))


def mbpp_path(data: str | Path | None = None) -> Path:
    from diffcoder.evaluation.data import data_file

    return data_file(MBPP_FILE, data, "MBPP",
                     f"Get the sanitized MBPP file `{MBPP_FILE}` (427 tasks) from the google-research/mbpp repository")


def _entry_point(code: str, first_test: str) -> str:
    names = re.findall(r"^def\s+(\w+)\s*\(", code, re.M)
    for name in names:
        if re.search(rf"\b{re.escape(name)}\s*\(", first_test):
            return name
    return names[0] if names else ""


def load(data: str | Path | None = None, variant: str | None = None) -> list[MbppTask]:
    path = mbpp_path(data)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); it should be the sanitized MBPP list") from exc
    tasks = []
    for d in rows:
        tests = d["test_list"]
        imports = "\n".join(d.get("test_imports") or [])
        test = (imports + "\n" if imports else "") + "\n".join(tests)
        text = d.get("prompt") or d.get("text", "")
        # One test shown in the prompt, as is customary, so the model learns the function's name and shape.
        prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
        instruction = (
            f"{text}\nYour code should pass this test:\n\n{tests[0]}\n\n"
            "Reply with the Python function in one ```python code block."
        )
        tasks.append(MbppTask("mbpp", f"Mbpp/{d['task_id']}", prompt, _entry_point(d["code"], tests[0]),
                              list(MBPP_STOPS), instruction, d["code"], test))
    return tasks
