"""Does block-diffusion generation improve after a short CPT? Held-out continuation accuracy before vs after.

For held-out rows of the packed corpus: prompt = the first P tokens, reference = the next G tokens. Both models
decode G tokens with the block-diffusion decoder (block 4, one token per step, greedy, no EOS stop); we report
the fraction of generated tokens equal to the reference, token by token (exact continuation accuracy) and a
sample decoded text.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_generation_check.py --data /tmp/dc/pyenv \
        --before default --after /tmp/dc/ablation/with_warmup/final --rows 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffcoder
from diffcoder.decoding import generate, generate_ar
from diffcoder.training.data import PackedRows


def score(path: str, prompts: torch.Tensor, refs: torch.Tensor, block: int, ar: bool = False) -> dict:
    model, tok = diffcoder.load(path)
    if ar:  # the start point as the AR model it was trained as: greedy causal decoding, the reference ceiling
        out = generate_ar(model, prompts, max_new_tokens=refs.shape[1], eos_id=-1)
    else:
        out = generate(model, prompts, steps=refs.shape[1], gen_length=refs.shape[1], block_length=block,
                       eos_id=-1, shift=model.config.shift)
    gen = out[:, prompts.shape[1]:]
    acc = (gen == refs).float().mean().item()
    return {"model": str(path), "continuation_token_accuracy": acc,
            "sample": tok.decode(gen[0]) if tok is not None else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--before", default="default")
    ap.add_argument("--after", required=True)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--results", default="benchmarks/results/train_generation_check.json")
    args = ap.parse_args()
    rows = PackedRows(args.data, "val", args.prompt_len + args.gen_len)
    x = torch.cat(list(rows.sequential(args.rows, args.rows)))
    prompts, refs = x[:, : args.prompt_len], x[:, args.prompt_len:]
    res = {"args": vars(args), "before": score(args.before, prompts, refs, 4), "after": score(args.after, prompts, refs, 4),
           "ar_baseline_before": score(args.before, prompts, refs, 1, ar=True)}
    print(json.dumps(res, indent=2))
    Path(args.results).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
