"""The demo request on a model at several confidence thresholds: tokens per forward, speed, and whether the answer's
first function is a correct palindrome check (run in the evaluation sandbox).

    python benchmarks/demo_threshold_sweep.py --model smollm2 --out benchmarks/results/demo_threshold_sweep.json

Tokens per forward and the answers are deterministic (greedy); tokens/s depends on the machine's load.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import torch

CHECKS = 'assert {f}("racecar")\nassert {f}("abba")\nassert not {f}("python")\nassert not {f}("ab")\n'


def first_function(code: str) -> str | None:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    return next((n.name for n in tree.body if isinstance(n, ast.FunctionDef)), None)


def judge(answer: str, sandbox) -> tuple[bool, str]:
    """The answer's first code block must define a function that tells palindromes from other strings."""
    from diffcoder.evaluation.extract import extract_code

    code = extract_code(answer)
    name = first_function(code)
    if name is None:
        return False, "no parseable function"
    result = sandbox.run(code + "\n" + CHECKS.format(f=name))
    return result.passed, result.kind if not result.passed else name


def run_one(model, tokenizer, defaults: dict, ids: list[int], threshold: float | None, max_new_tokens: int) -> dict:
    from diffcoder.decoding import generate

    kw = {k: v for k, v in defaults.items() if k in ("block_length", "shift", "remasking")}
    t0 = time.perf_counter()
    res = generate(model, [ids], max_new_tokens=max_new_tokens, threshold=threshold, temperature=0.0,
                   eos_id=tokenizer.eos_token_id, return_result=True, **kw)
    seconds = time.perf_counter() - t0
    out = res.generated[0].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return {"threshold": threshold, "generated_tokens": res.generated_tokens, "forwards": res.forwards,
            "tokens_per_forward": round(res.generated_tokens / max(res.forwards, 1), 3),
            "seconds": round(seconds, 2), "tokens_per_second": round(res.generated_tokens / seconds, 2),
            "answer": tokenizer.decode(out, skip_special_tokens=True), "settings": kw}


def main() -> None:
    import diffcoder
    from diffcoder.commands import DEMO_REQUEST, encode_prompt
    from diffcoder.evaluation.sandbox import Sandbox

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--thresholds", default="none,0.95,0.9,0.8,0.7,0.5,0.3")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--request", default=DEMO_REQUEST)
    ap.add_argument("--out", default="benchmarks/results/demo_threshold_sweep.json")
    args = ap.parse_args()
    loaded = diffcoder.load(args.model)
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, args.request, chat=True)
    sandbox = Sandbox()
    rows = []
    for t in args.thresholds.split(","):
        row = run_one(model, tokenizer, loaded.defaults, ids, None if t == "none" else float(t), args.max_new_tokens)
        row["correct"], row["verdict"] = judge(row["answer"], sandbox)
        rows.append(row)
        print(f"threshold {t:>5}: {row['tokens_per_forward']:.3f} tokens/forward, {row['tokens_per_second']} tok/s, "
              f"correct={row['correct']} ({row['verdict']})", flush=True)
    device = f"cpu, {torch.get_num_threads()} torch threads" if model.device.type == "cpu" else str(model.device)
    result = {"model": args.model, "request": args.request, "max_new_tokens": args.max_new_tokens,
              "device": device, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
