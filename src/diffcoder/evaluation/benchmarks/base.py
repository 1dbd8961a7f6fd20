"""The task interface every benchmark implements, and the registry the harness and the CLI read.

A benchmark is a small module with a `Task` subclass and a loader. A task says what the model is given for a
prompt style (`prompt_text`, and `fim_suffix` when the style fills a gap), where its output ends
(`stop_strings`), what of the output is kept (`completion_code`) and the program that tests it (`program`:
untrusted code plus the benchmark's trusted test, run by the sandbox). The harness (batching, sandbox, resume,
pass@k, summary, `compare`) knows nothing else about a benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from diffcoder.errors import ConfigError
from diffcoder.evaluation.extract import cut_at_stops
from diffcoder.evaluation.sandbox import Program

# Prompt styles: base (continue a text prompt, cut at stop strings), instruct (chat template, code block
# extracted), fim (fill the gap between a prefix and a suffix with the checkpoint's FIM tokens), prefix-only
# (infilling tasks done left to right from the prefix alone: the baseline FIM is measured against).
STYLES = ("base", "instruct", "fim", "prefix-only")


@dataclass
class Task:
    benchmark: str
    task_id: str
    prompt: str  # the text the model continues (infilling: the prefix)
    entry_point: str = ""
    stops: list[str] = field(default_factory=list)
    instruction: str = ""  # instruct prompt: the user message
    reference: str = ""  # a known-good completion (what `reference_program` tests)

    styles: ClassVar[tuple[str, ...]] = ("base",)

    def check_style(self, style: str) -> None:
        if style not in self.styles:
            raise ConfigError(f"{self.benchmark} has no {style!r} prompt style; choose one of "
                              f"{', '.join(self.styles)}")

    def prompt_text(self, style: str) -> str:
        """What the model is given: the instruct message, else the prompt without trailing whitespace (tokenized on
        its own a trailing newline is cut off from the next line's indentation, a split the model rarely saw in
        training; the completion supplies it)."""
        return self.instruction if style == "instruct" else self.prompt.rstrip()

    def fim_suffix(self, style: str) -> str | None:
        """The text after the gap when `style` fills one (the prompt is then laid out in FIM order), else None."""
        return None

    def stop_strings(self, style: str) -> list[str]:
        """Strings that end the output (instruct answers end at a finished code block instead)."""
        return [] if style == "instruct" else list(self.stops)

    def completion_code(self, raw: str, style: str) -> str:
        """What of the model's raw output is kept."""
        return cut_at_stops(raw, self.stop_strings(style))

    def program(self, code: str, style: str) -> Program:
        """The program made of `code` (untrusted) and the trusted test that passes iff it is right."""
        raise NotImplementedError

    def reference_program(self) -> Program:
        """The program of the known-good completion: it must pass (the loaders' tests check every task)."""
        return self.program(self.reference, self.styles[0])


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the CLI and harness see it: its loader and, for benchmarks with several variants, the
    flag that picks one (`--split`, `--task`) and its values."""

    name: str
    title: str
    load: Callable[[str | Path | None, str | None], list[Task]]
    styles: tuple[str, ...] = ("base",)
    variant_flag: str = ""  # e.g. "--split"; empty: no variants
    variants: tuple[str, ...] = ()
    data_help: str = ""

    def check_variant(self, variant: str | None) -> str | None:
        if not self.variants:
            if variant:
                raise ConfigError(f"{self.name} has no variants, got {variant!r}")
            return None
        if variant not in self.variants:
            got = "none given" if variant is None else f"got {variant!r}"
            raise ConfigError(f"{self.name} needs {self.variant_flag} with one of {', '.join(self.variants)} "
                              f"({got})")
        return variant

    def load_tasks(self, data: str | Path | None = None, variant: str | None = None) -> list[Task]:
        return self.load(data, self.check_variant(variant))
