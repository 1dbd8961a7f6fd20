"""HumanEval infilling (Bavarian et al., 2022): a span cut out of a canonical HumanEval solution, to be filled back
given the code before it (the prompt) and after it (the suffix). Splits: single-line (1033 gaps), multi-line
(5815), random-span (1640) and random-span-light (164, one per task).

Styles: `fim` lays prefix and suffix out with the checkpoint's FIM tokens (`diffcoder.fim`) and takes the middle up
to the FIM end (EOS or an end-of-middle token); `prefix-only` is the left-to-right baseline: the model continues the
prefix alone, its output is cut at the usual HumanEval stop strings or where it starts writing the suffix's first
non-blank line (so a model that writes the right middle and carries on into the suffix is not penalised), and the
suffix is appended. Either way the program is `prefix + middle + suffix`, tested by the task's `check`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

from diffcoder.evaluation.benchmarks.base import Task
from diffcoder.evaluation.extract import HUMANEVAL_STOPS, cut_at_stops
from diffcoder.evaluation.sandbox import Program

FOLDER = "humaneval-infilling"
SPLITS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


@dataclass
class InfillingTask(Task):
    suffix: str = ""  # the code after the gap
    test: str = ""  # the HumanEval task's `check` function
    context: str = ""  # the original HumanEval prompt: trusted helpers the test may use (`poly`, `encode_cyclic`)

    styles: ClassVar[tuple[str, ...]] = ("fim", "prefix-only")

    def prompt_text(self, style: str) -> str:
        # FIM data is cut at character positions, so the prefix goes in as it is; a left-to-right prompt drops its
        # trailing whitespace as the HumanEval base prompt does (the completion supplies it).
        return self.prompt if style == "fim" else self.prompt.rstrip()

    def fim_suffix(self, style: str) -> str | None:
        return self.suffix if style == "fim" else None

    def suffix_head(self) -> str:
        """The suffix up to the end of its first non-blank line (where a left-to-right model that wrote the
        middle would carry on); empty when the suffix is blank."""
        body = self.suffix.lstrip("\n")
        if not body.strip():
            return ""
        first = next(line for line in body.split("\n") if line.strip())
        return self.suffix[: self.suffix.index(first) + len(first)]

    def stop_strings(self, style: str) -> list[str]:
        if style == "fim":
            return []  # the middle ends at the FIM end token
        head = self.suffix_head()
        return [*HUMANEVAL_STOPS, head] if head else list(HUMANEVAL_STOPS)

    def completion_code(self, raw: str, style: str) -> str:
        return cut_at_stops(raw, self.stop_strings(style))

    def program(self, code: str, style: str) -> Program:
        """`code` is the middle (fim) or the cut continuation of the stripped prefix (prefix-only)."""
        solution = self.prompt_text(style) + code + self.suffix
        return Program(solution, f"{self.test}\n\ncheck({self.entry_point})\n", self.context, self.entry_point)

    def reference_program(self) -> Program:
        return self.program(self.reference, "fim")


@cache
def _humaneval_prompts() -> dict[str, str]:
    """The original HumanEval prompts by task id (the trusted context of each task's test)."""
    from diffcoder.evaluation.benchmarks.humaneval import load as load_humaneval

    try:
        return {t.task_id: t.prompt for t in load_humaneval()}
    except Exception:  # noqa: BLE001 - without the package the test takes its helpers from the program
        return {}


def load(data: str | Path | None, variant: str | None) -> list[InfillingTask]:
    from diffcoder.evaluation.data import data_file

    name = f"{FOLDER}/{SPLITS[variant]}"
    path = data_file(name, data, f"HumanEval infilling ({variant})",
                     f"Get `{SPLITS[variant]}` from the openai/human-eval-infilling repository into a "
                     f"`{FOLDER}/` folder")
    prompts = _humaneval_prompts()
    tasks = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            base_id = "HumanEval/" + d["task_id"].split("/")[2]
            tasks.append(InfillingTask(f"humaneval-infilling/{variant}", d["task_id"], d["prompt"], d["entry_point"],
                                       list(HUMANEVAL_STOPS), "", d["canonical_solution"], d["suffix"], d["test"],
                                       prompts.get(base_id, "")))
    return tasks
