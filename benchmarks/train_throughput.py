"""Training throughput: block diffusion beside AR, full fine-tuning beside LoRA, in one run, same code path.

Every configuration runs `Trainer.train_step` on the same model, data, batch and sequence length. Reported per
configuration: clean tokens/s (tokens of x0 per second; the diffusion forward runs over [xt ; x0], 2L positions),
MFU = 6 * N * tokens/s / peak FLOP/s (N = the base model's parameters; the same N for LoRA, so MFU compares
useful work), and memory: on CUDA the peak allocated during the configuration's own steps (configurations run one
after another, each freed before the next); on the CPU the bytes of the largest logits buffer, the plain head's
[micro-batch, L, V] float32 logits beside the chunked head's largest chunk (configurations alternate step by step
there, so machine noise hits all alike).

    diffcoder data build python-env --out /tmp/dc/pyenv --max-tokens 300000
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/train_throughput.py --data /tmp/dc/pyenv \
        --seq-len 128 --batch 2 --steps 4
    # GPU (H100): --device cuda --seq-len 1024 --batch 16 --steps 20 --warmup 3 --compile
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from diffcoder.head_loss import default_chunk_rows, full_logits_bytes
from diffcoder.training.config import load_config
from diffcoder.training.trainer import Trainer

# Dense bf16 tensor-core peaks (FLOP/s) by device name; anything else: --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
CONFIGS = [("diffusion", "full"), ("ar", "full"), ("diffusion", "lora"), ("ar", "lora")]


def measured_cpu_peak_tflops(seconds: float = 1.0, n: int = 1024) -> float:
    """float32 matmul throughput of this CPU at the current thread count (the attainable peak, measured)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float, str]:
    if flag:
        return flag, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf, f"{name} dense bf16"
        raise SystemExit(f"no known peak for {name}; pass --peak-tflops")
    return measured_cpu_peak_tflops(), "measured fp32 matmul"


def make_trainer(args, objective: str, tuning: str) -> Trainer:
    ov = [f"model.path={args.model}", f"data.path={args.data}", f"data.seq_len={args.seq_len}",
          f"train.micro_batch_size={args.batch}", f"objective.kind={objective}", "objective.warmup_steps=0",
          f"train.out_dir={args.out}/{objective}-{tuning}", f"train.steps={args.steps + args.warmup}",
          f"train.device={args.device}", f"train.compile={str(args.compile).lower()}",
          f"model.gradient_checkpointing={str(args.checkpointing).lower()}", "train.eval_every=0"]
    if tuning == "lora":
        ov += ["lora.enabled=true", f"lora.rank={args.lora_rank}", f"lora.alpha={2 * args.lora_rank}"]
    return Trainer(load_config("cpt-small", ov), quiet=True)


def logits_bytes(tr: Trainer, objective: str, scored_rows: int) -> tuple[int, int]:
    """(plain head: [micro-batch, L or 2L, V] float32 logits, chunked head: its largest float32 chunk)."""
    c, vocab = tr.cfg, tr.model.config.vocab_size
    positions = c.data.seq_len * (2 if objective == "diffusion" and tr.shift else 1)
    chunk = min(c.train.loss_chunk_rows or default_chunk_rows(vocab), scored_rows)
    return full_logits_bytes(c.train.micro_batch_size * positions, vocab), full_logits_bytes(chunk, vocab)


def scored_rows_of(tr: Trainer, objective: str) -> int:
    """Rows the chunked head scores in one micro-batch (diffusion: the masked slots; AR: L - 1 per row)."""
    if objective == "ar":
        return tr.cfg.train.micro_batch_size * (tr.cfg.data.seq_len - 1)
    return int(tr.cfg.train.micro_batch_size * tr.cfg.data.seq_len * 0.6)  # E[mask rate] ~ 0.56 for B=4, u_max=1


def run_sequential(args) -> dict:
    """CUDA: one configuration at a time, peak memory of its own steps."""
    out = {}
    for objective, tuning in CONFIGS:
        tr = make_trainer(args, objective, tuning)
        for _ in range(args.warmup):
            tr.train_step()
        torch.cuda.reset_peak_memory_stats()
        tps = [tr.train_step()["tokens_per_s"] for _ in range(args.steps)]
        out[(objective, tuning)] = {"tps": tps, "peak_bytes": torch.cuda.max_memory_allocated(),
                                    "params": n_params(tr), "logits": logits_bytes(tr, objective,
                                                                                   scored_rows_of(tr, objective))}
        del tr
        gc.collect()
        torch.cuda.empty_cache()
    return out


def run_interleaved(args) -> dict:
    """CPU: all configurations built, steps alternate so machine noise hits each alike."""
    trainers = {cfg: make_trainer(args, *cfg) for cfg in CONFIGS}
    tps: dict = {cfg: [] for cfg in CONFIGS}
    for i in range(args.warmup + args.steps):
        for cfg, tr in trainers.items():
            rec = tr.train_step()
            if i >= args.warmup:
                tps[cfg].append(rec["tokens_per_s"])
    return {cfg: {"tps": tps[cfg], "peak_bytes": None, "params": n_params(tr),
                  "logits": logits_bytes(tr, cfg[0], scored_rows_of(tr, cfg[0]))} for cfg, tr in trainers.items()}


def n_params(tr: Trainer) -> int:
    """The base model's parameters (LoRA's adapters excluded, so full FT and LoRA share N)."""
    return sum(p.numel() for n, p in tr.model.named_parameters() if "lora_" not in n)


def mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def table(res: dict, peak: float) -> str:
    lines = ["| objective | tuning | clean tokens/s (median) | MFU | peak memory (CUDA) | logits: plain head → chunked |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (objective, tuning), r in res.items():
        tps = statistics.median(r["tps"])
        mfu = 6 * r["params"] * tps / (peak * 1e12)
        full, chunk = r["logits"]
        lines.append(f"| {objective} | {tuning} | {tps:,.1f} | {100 * mfu:.2f} % | {mib(r['peak_bytes'])} | "
                     f"{mib(full)} → {mib(chunk)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `diffcoder data build` directory")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch size")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile, allocator)")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, in TFLOP/s")
    ap.add_argument("--out", default="/tmp/dc/throughput")
    ap.add_argument("--results", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    res = run_sequential(args) if device.type == "cuda" else run_interleaved(args)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{where}; model {args.model}; micro-batch {args.batch} x seq {args.seq_len}; {args.steps} timed steps; "
          f"compile {args.compile}; peak {peak:.2f} TFLOP/s ({peak_source})")
    print(table(res, peak))
    result = {"device": where, "model": args.model, "seq_len": args.seq_len, "micro_batch": args.batch,
              "timed_steps": args.steps, "compile": args.compile, "lora_rank": args.lora_rank,
              "peak_tflops": peak, "peak_source": peak_source, "table": table(res, peak),
              "configs": {f"{o}-{t}": {"tokens_per_s": r["tps"], "params": r["params"], "peak_bytes": r["peak_bytes"],
                                       "logits_bytes_plain": r["logits"][0], "logits_bytes_chunked": r["logits"][1]}
                          for (o, t), r in res.items()}}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
