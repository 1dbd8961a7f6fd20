"""Turning model output into a program: stop strings for base prompts, code-block extraction for chat."""

from __future__ import annotations

import ast
import re

# Customary stop strings: a base model's completion of one function ends where top-level code begins.
HUMANEVAL_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n```"]
MBPP_STOPS = ["\nclass ", "\nassert ", '\n"""', "\nprint(", "\nif __name__", "\n```", "\n# Test", "\n# test"]

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*$", re.M)
_CODE_START = re.compile(r"^(def |class |import |from |@|async def )")


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text up to the earliest stop string (exclusive)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def code_blocks(text: str) -> list[tuple[str, str, bool]]:
    """Fenced blocks as (language, code, closed). An unclosed last block (output cut short) is kept."""
    blocks = []
    fences = list(_FENCE.finditer(text))
    i = 0
    while i < len(fences):
        opening = fences[i]
        body_start = opening.end() + 1
        if i + 1 < len(fences):
            closing = fences[i + 1]
            blocks.append((opening.group(1).lower(), text[body_start : closing.start()], True))
            i += 2
        else:
            blocks.append((opening.group(1).lower(), text[body_start:], False))
            i += 1
    return blocks


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def _code_from_prose(text: str) -> str | None:
    """Unfenced answer: the longest parseable run of lines starting at the first line that opens code."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _CODE_START.match(line)]
    for start in starts:
        for end in range(len(lines), start, -1):
            chunk = "\n".join(lines[start:end]).rstrip()
            if chunk and _parses(chunk):
                return chunk + "\n"
    return None


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code of a chat answer.

    Fenced blocks first: the one defining `entry_point` (when given), else the first Python-looking block.
    No fences: the longest parseable run of lines starting at a `def`/`class`/`import` line. Otherwise the
    answer itself (it may be bare code that does not parse; the test run will say so)."""
    blocks = [b for b in code_blocks(answer) if b[0] in ("", "python", "py", "python3")] or code_blocks(answer)
    blocks = [b for b in blocks if b[1].strip()]
    if blocks:
        if entry_point:
            pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
            defining = [b for b in blocks if pattern.search(b[1])]
            if defining:
                return defining[0][1]
        with_def = [b for b in blocks if re.search(r"^\s*def\s", b[1], re.M)]
        return (with_def or blocks)[0][1]
    code = _code_from_prose(answer)
    return code if code is not None else answer


def defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def has_complete_block(text: str, entry_point: str | None) -> bool:
    """True once the answer holds a closed code block with the wanted function: the rest is prose."""
    for _, code, closed in code_blocks(text):
        if closed and (defines(code, entry_point) if entry_point else "def " in code):
            return True
    return False


def trim_incomplete(code: str, prefix: str = "") -> str:
    """Drop a trailing top-level chunk cut short by the token budget (e.g. a second function half written),
    which would otherwise make the whole program a syntax error. Cuts only before lines at column 0, keeps
    the longest version for which `prefix + code` parses, and returns `code` unchanged when none does."""
    if _parses(prefix + code):
        return code
    lines = code.split("\n")
    for end in range(len(lines) - 1, 0, -1):
        if lines[end][:1] in ("", " ", "\t"):
            continue
        chunk = "\n".join(lines[:end]).rstrip() + "\n"
        if _parses(prefix + chunk):
            return chunk
    return code
