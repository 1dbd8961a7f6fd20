"""GPU decoding benchmark (issue 9): block-step latency vs the bandwidth bound, and tokens/s of our decoders,
the official per-block loop and transformers' AR, on the same random bf16 weights in one run.

Cases (--cases; those marked * run once per --batches entry, the others at batch 1 only):
  step          ms per block-step at batch 1: CUDA-graph replays of one step (static_decoding's own buffers),
                beside the bound = weight bytes / HBM bandwidth (measured here by a device-to-device copy)
  ours*         diffcoder generate, block 4, one token per step (the GPU path, CUDA graphs)
  ours-dynamic  the same, static_cache=False (the old path: host syncs every step)
  ours-compiled* the GPU path with compile_steps=True (torch.compile'd steps inside the graphs)
  official      benchmarks/decode_speed.official_loop (one extra commit forward per block)
  ar*           diffcoder generate_ar (the GPU path)
  ar-dynamic    generate_ar, static_cache=False
  ar-compiled*  generate_ar with compile_steps=True
  hf-static*    transformers generate, cache_implementation="static", forward = torch.compile(reduce-overhead)
  hf-dynamic    transformers generate, default dynamic cache, eager
Every case: one warm-up call (hf-static: two; compile / graph capture, the seconds are reported), then one
timed call. The HF model shares our parameters' storage (load_state_dict(assign=True) into a meta-built
LlamaForCausalLM): one weight copy.
Results (results.json, table.md) are rewritten after every case, so a run cut short keeps what it measured.

  PYTHONPATH=src python benchmarks/gpu/decode_gpu.py --shape 8b --out $OUT
  PYTHONPATH=src python benchmarks/gpu/decode_gpu.py --shape tiny --device cpu --prompt-lens 16 \
      --batches 1,2 --new-tokens 16 --out /tmp/decbench \
      --cases step,ours,official,ar,ours-dynamic,ar-dynamic,hf-dynamic
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: official_loop
from decode_speed import official_loop  # noqa: E402

from diffcoder.decode_batch import Canvas  # noqa: E402
from diffcoder.decode_rule import StepRule  # noqa: E402
from diffcoder.decoding import generate, generate_ar  # noqa: E402
from diffcoder.model import DiffusionLM, ModelConfig  # noqa: E402
from diffcoder.static_decoding import _Steps, prefill, state_for  # noqa: E402

SHAPES = {  # 8b: Stable-DiffCoder-8B's shape; tiny: a few MB, for the CPU smoke test
    "8b": dict(vocab_size=155136, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               max_position_embeddings=8192),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                 max_position_embeddings=1024),
}
MASK_ID, BLOCK, NOMINAL_TBS = 5, 4, 3.35  # mask id inside the vocabulary; H100 SXM nominal HBM3 bandwidth
BATCHED = {"ours", "ar", "hf-static", "ours-compiled", "ar-compiled"}


def on_meta_in_bf16(build):
    """`build()` with parameters on the meta device in bfloat16: no weight memory until `to_empty` or `assign`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.set_default_dtype(old)


def build_model(shape: str, device: str, seed: int = 0) -> DiffusionLM:
    """Random bf16 weights made directly on the device (meta-built, so no float32 or CPU copy ever exists)."""
    cfg = ModelConfig(**SHAPES[shape], tie_word_embeddings=False, mask_token_id=MASK_ID, block_size=BLOCK)
    model = on_meta_in_bf16(lambda: DiffusionLM(cfg)).to_empty(device=device).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else torch.nn.init.normal_(p, std=0.02)
    return model


def build_hf(model: DiffusionLM):
    """transformers' LlamaForCausalLM on the same parameter storage (no second copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(**model.config.to_hf_dict())
    hf = on_meta_in_bf16(lambda: LlamaForCausalLM(hcfg))
    result = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    with torch.device(model.device):  # non-persistent rotary buffers: rebuilt on the device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left or result.missing_keys:
        raise RuntimeError(f"HF model not fully loaded: meta {left}, missing {result.missing_keys}")
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    return hf.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hbm_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device == "cuda" else (1 << 25)
    src, dst = (torch.empty(n, dtype=torch.uint8, device=device) for _ in range(2))
    dst.copy_(src)
    sync(device)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def step_ms(model: DiffusionLM, prompt_len: int, new_tokens: int, reps: int) -> dict:
    """One block step on static_decoding's buffers, after a prefill (graph replays on CUDA, else eager)."""
    dev = model.device.type
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, model.config.vocab_size, (prompt_len,), generator=gen)
    canvas = Canvas([prompt], new_tokens, BLOCK, MASK_ID, model.device, lead=BLOCK)
    st = state_for(model, 1, canvas.width, BLOCK, False)
    t0 = time.perf_counter()
    steps = _Steps(model, st, StepRule(MASK_ID), False, None, False, True)  # captures the graphs on CUDA
    visible = steps.visible_for(canvas.span(0)[1])

    def run(first: bool) -> None:
        steps(first, visible)

    st.load(canvas, model.config.max_position_embeddings)
    prefill(model, st, canvas.t0 - BLOCK)
    st.block_start.fill_(canvas.t0)
    st.step.zero_()
    st.k.fill_(1)
    run(True)
    sync(dev)
    warm = time.perf_counter() - t0
    timed = {}
    for first in (False, True):  # a later step (the block alone) and a block's first step (2B queries)
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(first)
            end.record()
            torch.cuda.synchronize()
            timed[first] = start.elapsed_time(end) / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                run(first)
            timed[first] = (time.perf_counter() - t0) * 1e3 / reps
    ms, ms_first = timed[False], timed[True]
    kv_bytes = sum(t.numel() * t.element_size() for t in st.cache.k + st.cache.v)
    return dict(ms_per_step=ms, ms_first_step=ms_first, warmup_s=warm, reps=reps, kv_bytes=kv_bytes,
                width=st.ids.shape[1],
                graphs=dev == "cuda")


def run_case(case: str, model: DiffusionLM, hfbox: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    """Warm-up call(s), then one timed call: tokens/s, forwards, peak memory, row 0's generated ids."""
    dev = model.device.type
    P = len(prompts[0])
    kw = dict(steps=new_tokens, gen_length=new_tokens, block_length=BLOCK, mask_id=MASK_ID, eos_id=-1,
              return_result=True)

    def call():
        if case in ("ours", "ours-dynamic", "ours-compiled"):  # static_cache=True: the GPU path on CPU too
            r = generate(model, prompts, **kw, static_cache=case != "ours-dynamic",
                         compile_steps=case == "ours-compiled")
            return r.sequences[0].tolist(), r.generated_tokens, r.forwards
        if case in ("ar", "ar-dynamic", "ar-compiled"):
            r = generate_ar(model, prompts, new_tokens, eos_id=-1, return_result=True,
                            static_cache=case != "ar-dynamic", compile_steps=case == "ar-compiled")
            return r.sequences[0].tolist(), r.generated_tokens, r.forwards
        if case == "official":
            with torch.device(model.device):  # official_loop makes its tensors with the default device
                seq, fwd = official_loop(model, prompts[0], new_tokens, BLOCK, new_tokens, MASK_ID)
            return seq, new_tokens, fwd
        if case in ("hf-static", "hf-dynamic"):
            if "hf" not in hfbox:
                hfbox["hf"] = build_hf(model)
            hf = hfbox["hf"]
            extra = {}
            if case == "hf-static":
                if dev != "cuda":
                    raise RuntimeError("needs CUDA (reduce-overhead = CUDA graphs)")
                if "compiled" not in hfbox:
                    hfbox["compiled"] = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                hf.forward = hfbox["compiled"]
                extra["cache_implementation"] = "static"
                if hasattr(hf.generation_config, "disable_compile"):
                    extra["disable_compile"] = True  # compiled by hand above, as the HF docs show
            else:
                hf.__dict__.pop("forward", None)  # eager
            ids = torch.tensor(prompts, device=model.device)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
            return out[0].tolist(), (out.shape[1] - P) * out.shape[0], out.shape[1] - P
        raise ValueError(f"unknown case {case}")

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2 if case == "hf-static" else 1):  # cudagraph trees: a shape warms, then records
        call()
    sync(dev)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq, tokens, forwards = call()
    sync(dev)
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return dict(tok_s=tokens / sec, seconds=sec, warmup_s=warm, tokens=tokens, forwards=forwards,
                tpf=tokens / forwards, ms_per_forward=sec * 1e3 / forwards, peak_gib=peak,
                gen64=seq[P : P + 64])


def free(model: DiffusionLM) -> None:
    model.__dict__.pop("_decode_states", None)  # static_decoding keeps buffers (KV cache) and graphs here
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summarize(meta: dict, rows: list[dict]) -> str:
    def get(case, P, batch=1):
        return next((r for r in rows if r["case"] == case and r["prompt"] == P and r["batch"] == batch
                     and "tok_s" in r), None)

    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; transformers {meta.get('transformers')};"
             f" shape {meta['shape']}, bf16 random weights ({meta['weight_gib']:.2f} GiB); "
             f"{meta['new_tokens']} new tokens, block {BLOCK}, one token per step, no EOS stop.",
             f"KV cache for batch 64 x 2,304 positions: {meta['kv_gib_b64_2304']:.2f} GiB (bf16).",
             f"Command: `{meta['command']}`", ""]
    if "bandwidth_tbs" in meta:
        lines.append(f"Measured copy bandwidth {meta['bandwidth_tbs']:.2f} TB/s; bound per step "
                     f"(all weights / measured) {meta['bound_ms']:.2f} ms, at nominal {NOMINAL_TBS} TB/s "
                     f"{meta['bound_nominal_ms']:.2f} ms; without the embedding table (not read by a step) "
                     f"{meta['bound_noembed_ms']:.2f} ms.")
        lines.append("")
    lines += ["| case | prompt | batch | tok/s | forwards | tok/forward | ms/forward | warm-up s | peak GiB "
              "| note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms_per_step" in r:
            how = "graph replays" if r["graphs"] else "eager steps"
            note = (f"{r['ms_per_step']:.2f} ms per later step, {r['ms_first_step']:.2f} ms per first step "
                    f"({r['reps']} {how} each, width {r['width']})")
            if "bound_ms" in meta:
                note += f", {100 * meta['bound_ms'] / r['ms_per_step']:.0f} % of the bound"
            lines.append(f"| step | {r['prompt']} | 1 | - | - | - | {r['ms_per_step']:.2f} | "
                         f"{r['warmup_s']:.1f} | {fmt(r.get('peak_gib'), '.2f')} | {note} |")
        elif "tok_s" in r:
            lines.append(f"| {r['case']} | {r['prompt']} | {r['batch']} | {r['tok_s']:.1f} | "
                         f"{r['forwards']} | {r['tpf']:.2f} | {r['ms_per_forward']:.2f} | "
                         f"{r['warmup_s']:.1f} | {fmt(r['peak_gib'], '.2f')} | |")
        else:
            lines.append(f"| {r['case']} | {r['prompt']} | {r['batch']} | - | - | - | - | - | - | "
                         f"{r.get('error', '')[:120]} |")
    lines += ["", "Goals (issue 9):"]
    for P in meta["prompt_lens"]:
        for b in meta["batches"]:
            o, h, a = get("ours", P, b), get("hf-static", P, b), get("ar", P, b)
            oc, ac = get("ours-compiled", P, b), get("ar-compiled", P, b)
            parts = [f"ours/hf-static {o['tok_s'] / h['tok_s']:.2f}x (goal >= 1.2)" if o and h else None,
                     f"ar/hf-static {a['tok_s'] / h['tok_s']:.2f}x (goal >= 1.0)" if a and h else None,
                     f"ours-compiled/hf-static {oc['tok_s'] / h['tok_s']:.2f}x" if oc and h else None,
                     f"ar-compiled/hf-static {ac['tok_s'] / h['tok_s']:.2f}x" if ac and h else None]
            if b == 1:
                f = get("official", P)
                parts.append(f"ours/official {o['tok_s'] / f['tok_s']:.2f}x (goal >= 3)" if o and f else None)
                s = next((r for r in rows if "ms_per_step" in r and r["prompt"] == P), None)
                if s:
                    parts.append(f"step {s['ms_per_step']:.2f} ms (goal <= 7 ms)")
            parts = [p for p in parts if p]
            if parts:
                lines.append(f"- prompt {P}, batch {b}: " + "; ".join(parts))
    lines += ["", "Same tokens (first 64 generated, batch 1; random bf16 weights may differ in the last bits "
              "between paths, so this reports rather than asserts):"]
    for P in meta["prompt_lens"]:
        for x, y in [("ours", "ours-dynamic"), ("ours", "official"), ("ours-compiled", "ours"), ("ar", "ar-dynamic"),
                     ("ar-compiled", "ar"),
                     ("ar", "hf-static"), ("ar", "hf-dynamic")]:
            rx, ry = get(x, P), get(y, P)
            if rx and ry:
                same = "equal" if rx["gen64"] == ry["gen64"] else "NOT equal"
                lines.append(f"- prompt {P}: {x} vs {y}: {same}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default="step,ours,official,ar,ours-dynamic,ar-dynamic,hf-static,hf-dynamic")
    ap.add_argument("--prompt-lens", default="512,2048")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--step-reps", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT", "decode_gpu_out"))
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no case after this wall time")
    ap.add_argument("--merge", help="comma list of results.json of earlier calls: one table of them all")
    args = ap.parse_args()
    T0 = time.perf_counter()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        meta, rows = dict(parts[0]["meta"]), [r for part in parts for r in part["rows"]]
        for key in ("prompt_lens", "batches"):
            meta[key] = sorted({x for part in parts for x in part["meta"][key]})
        meta["command"] = " ; ".join(part["meta"]["command"] for part in parts)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (Path(args.out) / "table.md").write_text(summarize(meta, rows) + "\n")
        print(summarize(meta, rows))
        return
    cases = args.cases.split(",")
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        for name in ("recompile_limit", "cache_size_limit"):  # 8 prompt/batch shapes x prefill + decode
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)

    t0 = time.perf_counter()
    model = build_model(args.shape, args.device)
    sync(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 2
    meta = dict(shape=args.shape, device=args.device, new_tokens=args.new_tokens, prompt_lens=prompt_lens,
                batches=batches, torch=torch.__version__, weight_gib=weight_bytes / 2**30,
                build_s=time.perf_counter() - t0, command=" ".join(["python"] + sys.argv),
                device_name=torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    c = model.config
    kv_per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2  # bytes, bf16 k and v
    meta["kv_gib_b64_2304"] = 64 * 2304 * kv_per_position / 2**30
    bw = hbm_bandwidth(args.device)
    meta["bandwidth_tbs"] = bw / 1e12
    if args.device == "cuda":
        meta.update(bound_ms=weight_bytes / bw * 1e3,
                    bound_nominal_ms=weight_bytes / (NOMINAL_TBS * 1e12) * 1e3,
                    bound_noembed_ms=(weight_bytes - embed_bytes) / bw * 1e3)
    else:
        meta.pop("bandwidth_tbs")

    rows: list[dict] = []
    hfbox: dict = {}
    gen = torch.Generator().manual_seed(0)
    for P in prompt_lens:
        pool = torch.randint(10, model.config.vocab_size, (max(batches), P), generator=gen).tolist()
        for case in cases:
            for b in (batches if case in BATCHED else [1]):
                row = dict(case=case, prompt=P, batch=b)
                if time.perf_counter() - T0 > args.budget_s:
                    row["error"] = "skipped: --budget-s reached"
                elif case == "step":
                    try:
                        if args.device == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        row.update(step_ms(model, P, args.new_tokens, args.step_reps))
                        if args.device == "cuda":
                            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
                        row["error"] = f"{type(e).__name__}: {e}"
                else:
                    try:
                        row.update(run_case(case, model, hfbox, pool[:b], args.new_tokens))
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"
                free(model)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "gen64"}), flush=True)
                meta["elapsed_s"] = time.perf_counter() - T0
                (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
                (out / "table.md").write_text(summarize(meta, rows) + "\n")
    print(summarize(meta, rows))


if __name__ == "__main__":
    main()
