"""Decoding speed on the embedded default (issue 2's performance figures), all measured in one run.

Each case runs in its own subprocess so its peak memory (max RSS) is its own. Cases:
  official  - a faithful re-implementation of the official per-block loop: prefill, S forwards per block, then one
              more forward to write the finished block's clean KV (crop-and-recommit), batch 1
  ours-b1   - diffcoder.decoding.generate, batch 1 (commit forward fused into the next block's first step)
  ours-b8   - the same decoder, 8 different prompts in one batch
  ar-ours   - diffcoder.decoding.generate_ar: causal attention, KV cache, greedy
  ar-hf     - transformers' LlamaForCausalLM.generate on the same checkpoint, greedy

Usage: python benchmarks/decode_speed.py [--new-tokens 256] [--out benchmarks/results/decode_speed.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that reverses the words in a sentence.",
]


def encode(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def official_loop(model, prompt, gen_length, block, steps, mask_id):
    """The official decoding structure, batch 1: S forwards per block plus one commit forward per block."""
    from diffcoder.decoding import commit_counts, propose

    P = len(prompt)
    dev = model.device
    x = torch.tensor([prompt + [mask_id] * gen_length], device=dev)
    S = steps // (gen_length // block)
    cache = model.new_cache(1, P + gen_length)
    start = P - P % block
    forwards = 0
    if start > 0:
        pos = torch.arange(start, device=dev)
        model(x[:, :start], attn_mask=(pos[None] // block <= pos[:, None] // block)[None, None], cache=cache)
        forwards += 1
    for s in range(start, P + gen_length, block):
        e = min(s + block, P + gen_length)
        fill = torch.zeros(e - s, dtype=torch.bool, device=dev)
        fill[max(P - s, 0):] = True
        for k in commit_counts(int(fill.sum()), S):
            if k == 0:
                continue
            logits = model(x[:, s:e], cache=cache, cache_start=s)[0]  # block sees cache + itself
            forwards += 1
            x0, conf = propose(logits, mask_id)
            conf = conf.masked_fill(~fill, -1.0)
            idx = conf.topk(k).indices
            x[0, s + idx] = x0[idx]
            fill[idx] = False
        model(x[:, s:e], cache=cache, cache_start=s)  # the extra forward that writes the clean block's KV
        forwards += 1
    return x[0].tolist(), forwards


def run_case(case: str, new_tokens: int) -> dict:
    import diffcoder
    from diffcoder.decoding import generate, generate_ar
    from diffcoder.pull import ensure_ar_origin

    path = ensure_ar_origin()
    model, tok = diffcoder.load(path)
    mask = model.config.mask_token_id
    prompts = [encode(tok, p) for p in PROMPTS]
    kw = dict(gen_length=new_tokens, steps=new_tokens, block_length=4, mask_id=mask, eos_id=-1, return_result=True)
    t0 = time.perf_counter()
    if case == "official":
        out, forwards = official_loop(model, prompts[0], new_tokens, 4, new_tokens, mask)
        seqs, n_tokens, batch = [out], new_tokens, 1
    elif case == "ours-b1":
        r = generate(model, [prompts[0]], **kw)
        seqs, n_tokens, forwards, batch = [s.tolist() for s in r.sequences], r.generated_tokens, r.forwards, 1
    elif case == "ours-b8":
        r = generate(model, prompts, **kw)
        seqs, n_tokens, forwards, batch = [s.tolist() for s in r.sequences], r.generated_tokens, r.forwards, 8
    elif case == "ar-ours":
        r = generate_ar(model, [prompts[0]], new_tokens, eos_id=-1, return_result=True)
        seqs, n_tokens, forwards, batch = [s.tolist() for s in r.sequences], r.generated_tokens, r.forwards, 1
    elif case == "ar-hf":
        from transformers import LlamaForCausalLM

        del model
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompts[0]])
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        seqs, n_tokens, forwards, batch = [out[0].tolist()], out.shape[1] - ids.shape[1], new_tokens, 1
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - t0
    return {"case": case, "batch": batch, "tokens": n_tokens, "seconds": seconds, "forwards": forwards,
            "tok_s": n_tokens / seconds, "tpf": n_tokens / forwards, "peak_rss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "sequences": seqs, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--case")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.md")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.new_tokens)))
        return
    results = {}
    for case in ["official", "ours-b1", "ours-b8", "ar-ours", "ar-hf"]:
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--new-tokens", str(args.new_tokens)],
                              capture_output=True, text=True, check=True)
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[case]
        print(f"{case:9s} {r['tok_s']:7.2f} tok/s  {r['forwards']:4d} forwards  {r['peak_rss_mb']:.0f} MB", flush=True)
    same_diff = results["official"]["sequences"][0] == results["ours-b1"]["sequences"][0]
    same_batch = results["ours-b8"]["sequences"][0] == results["ours-b1"]["sequences"][0]
    same_ar = results["ar-ours"]["sequences"][0] == results["ar-hf"]["sequences"][0]
    o, b1, b8, aro, arh = (results[c] for c in ["official", "ours-b1", "ours-b8", "ar-ours", "ar-hf"])
    n_blocks = args.new_tokens // 4
    lines = [
        f"Embedded default (SmolLM2-135M-Instruct, float32), {args.new_tokens} new tokens, block 4, steps = "
        f"gen_length (S = 4), CPU, torch threads = {b1['threads']}.",
        f"Command: `python benchmarks/decode_speed.py --new-tokens {args.new_tokens}`",
        "",
        "| case | batch | generated tok/s | tokens/forward | forwards | forwards/block | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in [("official per-block loop (reimplemented)", o), ("diffcoder generate", b1),
                    ("diffcoder generate", b8), ("diffcoder generate_ar (AR)", aro),
                    ("transformers generate (AR)", arh)]:
        per_block = f"{r['forwards'] / n_blocks:.2f}" if "AR" not in name else "-"
        lines.append(f"| {name} | {r['batch']} | {r['tok_s']:.2f} | {r['tpf']:.2f} | {r['forwards']} | "
                     f"{per_block} | {r['peak_rss_mb']:.0f} |")
    lines += [
        "",
        f"- identical tokens, official loop vs ours (batch 1): **{same_diff}**",
        f"- identical tokens, batch-8 row 0 vs batch 1: **{same_batch}**",
        f"- identical tokens, generate_ar vs transformers generate: **{same_ar}**",
        f"- ours vs official loop, batch 1: **{b1['tok_s'] / o['tok_s']:.2f}x** tokens/s (target >= 1.2x)",
        f"- batch 8 vs batch 1 total tokens/s: **{b8['tok_s'] / b1['tok_s']:.2f}x** (target >= 3x)",
        f"- AR: generate_ar vs transformers generate: **{aro['tok_s'] / arh['tok_s']:.2f}x** (target >= 1.5x)",
        "",
        "The embedded default has had no diffusion training, so the block-4 text is not meaningful; speed, "
        "forwards and token identity are what this table measures.",
    ]
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
