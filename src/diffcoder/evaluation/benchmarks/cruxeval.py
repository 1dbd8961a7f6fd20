"""CRUXEval (Gu et al., 2024): 800 short Python functions `f`, each with an input and its output. CRUXEval-O
predicts the output for the input, CRUXEval-I an input for the output.

Prompts are the one-shot completion form (no instruction, suited to base models): a worked example, then the
task's function and an assertion for the model to finish on its own line:

    -O: `assert f(<input>) ==` and the model writes the value;
    -I: `assert <output> == f(` and the model writes the arguments and the closing parenthesis.

The output is cut at the end of that line. Scoring executes the assertion in the sandbox: -I runs the task's code
and `f(<predicted input>)`, and the trusted checker compares the value it returns with the task's output; -O
evaluates the predicted value on its own (it must be a value, not a call of `f`, as CRUXEval asks) and the checker
compares it with the output, which `f(<input>)` returns for all 800 tasks (the tests check that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks.base import Task
from diffcoder.evaluation.sandbox import Program

CRUXEVAL_FILE = "cruxeval.jsonl"
TASKS = ("output", "input")
STOPS = ["\n"]
_EXAMPLE_CODE = "def f(values, scale):\n    kept = [v * scale for v in values if v > 0]\n    return kept[::-1]"
_HEADER = {
    "output": "# Each function is followed by an assertion giving the value it returns for one input.\n\n"
              f"{_EXAMPLE_CODE}\nassert f([3, -1, 2], 10) == [20, 30]\n\n",
    "input": "# Each function is followed by an assertion giving an input for which it returns the value shown.\n\n"
             f"{_EXAMPLE_CODE}\nassert [20, 30] == f([3, -1, 2], 10)\n\n",
}
ENTRY = "predicted"


@dataclass
class CruxTask(Task):
    code: str = ""
    input: str = ""  # the arguments of f, as Python source
    output: str = ""  # f's value, as a Python literal
    mode: str = "output"

    styles: ClassVar[tuple[str, ...]] = ("base",)

    def prediction(self, raw: str) -> str:
        """The predicted value (-O) or argument list (-I) in the model's line."""
        line = raw.split("\n", 1)[0].strip()
        if self.mode == "input" and line.endswith(")"):
            line = line[:-1].rstrip()  # the call's closing parenthesis
        return line

    def completion_code(self, raw: str, style: str) -> str:
        return self.prediction(raw)

    def program(self, code: str, style: str) -> Program:
        """`code` is the prediction. The program returns the value to compare from `predicted()`; the expected
        output is the checker's (trusted data), never the program's."""
        test = f"assert {ENTRY}() == ({self.output})\n"
        if self.mode == "output":
            # a bare assignment: an empty prediction is a syntax error, not `return` (None)
            return Program(f"def {ENTRY}():\n    value = {code}\n    return value\n", test, "", ENTRY)
        return Program(f"{self.code}\n\n\ndef {ENTRY}():\n    return f({code})\n", test, "", ENTRY)

    def reference_program(self) -> Program:
        return self.program(self.reference, "base")


def cruxeval_path(data: str | Path | None) -> Path:
    from diffcoder.evaluation.data import data_file

    return data_file(CRUXEVAL_FILE, data, "CRUXEval",
                     f"Get `{CRUXEVAL_FILE}` (800 tasks) from the facebookresearch/cruxeval repository (data/)")


def load(data: str | Path | None, variant: str | None) -> list[CruxTask]:
    path = cruxeval_path(data)
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            code, inp, out, task_id = d["code"], d["input"], d["output"], d["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} line {n} is not a CRUXEval record with code, input, output and id "
                              f"({exc})") from exc
        if variant == "output":
            prompt, reference = f"{_HEADER['output']}{code}\nassert f({inp}) ==", out
        else:
            prompt, reference = f"{_HEADER['input']}{code}\nassert {out} == f(", inp
        tasks.append(CruxTask(f"cruxeval/{variant}", f"CRUXEval-{variant[0].upper()}/{task_id}", prompt, "",
                              list(STOPS), "", reference, code, inp, out, variant))
    return tasks
