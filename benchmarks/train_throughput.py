"""Training tokens/s of the block-diffusion objective vs plain AR training of the same model in the same code.

Both objectives run through `Trainer.train_step` (same model, data, optimizer, batch, sequence length); steps
alternate diffusion / AR so machine noise hits both alike. Tokens = clean tokens of x0 per step (the diffusion
forward runs on [xt ; x0], 2L positions, so ~0.5x is the expected ratio from FLOPs alone).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_throughput.py --data /tmp/dc/pyenv \
        --seq-len 64 --batch 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from diffcoder.training.config import load_config
from diffcoder.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per objective (after 1 warm-up step each)")
    ap.add_argument("--out", default="/tmp/dc/throughput")
    ap.add_argument("--results", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    trainers = {}
    for kind in ("diffusion", "ar"):
        cfg = load_config("cpt-small", [f"model.path={args.model}", f"data.path={args.data}",
                                        f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
                                        f"objective.kind={kind}", "objective.warmup_steps=0",
                                        f"train.out_dir={args.out}/{kind}", f"train.steps={args.steps + 1}"])
        trainers[kind] = Trainer(cfg, quiet=True)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(args.steps + 1):
        for kind, tr in trainers.items():
            rec = tr.train_step()
            if i > 0:  # the first step pays one-time costs (allocator, lazy init)
                times[kind].append(rec["tokens_per_s"])
    tps = {k: statistics.median(v) for k, v in times.items()}
    dev = next(iter(trainers.values())).device
    result = {
        "device": str(dev) if dev.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "model": args.model, "seq_len": args.seq_len, "micro_batch": args.batch, "timed_steps": args.steps,
        "tokens_per_s": tps, "tokens_per_s_all": times, "ratio_diffusion_over_ar": tps["diffusion"] / tps["ar"],
        # steps alternate, so each diffusion step has an AR neighbour under the same machine load
        "ratio_paired_median": statistics.median(d / a for d, a in zip(times["diffusion"], times["ar"])),
    }
    print(json.dumps(result, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
