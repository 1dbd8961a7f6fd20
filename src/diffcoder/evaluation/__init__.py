"""Evaluation: HumanEval/MBPP with sandboxed execution, held-out likelihood, and run comparison (DESIGN §6)."""
