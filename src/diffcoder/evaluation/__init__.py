"""Evaluation: HumanEval/MBPP with sandboxed execution, held-out likelihood, and run comparison (docs/design.md §6)."""
