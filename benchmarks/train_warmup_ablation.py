"""Warmup ablation on the embedded default (docs/design.md §3): block-diffusion CPT of SmolLM2-135M-Instruct (+ mask token)
with and without the u_max warmup, same data/LR/seed. Writes both runs' logs, a side-by-side PNG of loss and
grad norm, and a JSON summary (peak grad norm of each).

    diffcoder data build python-env --out /tmp/dc/pyenv --max-tokens 2000000 --val-fraction 0.02
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_warmup_ablation.py --data /tmp/dc/pyenv \
        --steps 100 --warmup 40 --seq-len 32 --batch 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffcoder.training.config import load_config
from diffcoder.training.plot import read_log
from diffcoder.training.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="/tmp/dc/ablation")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-5)
    args = ap.parse_args()
    runs = {"with_warmup": args.warmup, "no_warmup": 0}
    summary = {"args": vars(args), "runs": {}}
    for name, s_warm in runs.items():
        out = Path(args.out) / name
        cfg = load_config("cpt-small", [
            f"data.path={args.data}", f"train.out_dir={out}", f"train.steps={args.steps}",
            f"objective.warmup_steps={s_warm}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
            f"optim.lr={args.lr}", "optim.warmup_steps=0", f"train.eval_every={args.steps // 2}", "train.eval_batches=2",
            "train.eval_t_points=2", f"train.save_every={args.steps}"])
        t0 = time.time()
        train(cfg)
        recs = read_log(out)
        tr = [r for r in recs if r["kind"] == "train"]
        ev = [r for r in recs if r["kind"] == "eval"]
        peak = max(tr, key=lambda r: r["grad_norm"])
        summary["runs"][name] = {
            "warmup_steps": s_warm, "wall_s": round(time.time() - t0, 1),
            "peak_grad_norm": peak["grad_norm"], "peak_step": peak["step"],
            "grad_norm_first_full_objective_step": tr[s_warm]["grad_norm"] if s_warm < len(tr) else None,
            "final_loss_mean_last10": sum(r["loss"] for r in tr[-10:]) / len(tr[-10:]),
            "eval": ev,
        }
        print(json.dumps(summary["runs"][name], indent=2))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    plot_side_by_side({n: Path(args.out) / n for n in runs}, res / "train_warmup_ablation.png", args.warmup)
    (res / "train_warmup_ablation.json").write_text(json.dumps(summary, indent=2))
    for n in runs:  # keep the raw logs next to the figure
        (res / f"train_warmup_ablation_{n}.jsonl").write_text((Path(args.out) / n / "log.jsonl").read_text())


def plot_side_by_side(runs: dict[str, Path], png: Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for name, run in runs.items():
        tr = [r for r in read_log(run) if r["kind"] == "train"]
        steps = [r["step"] for r in tr]
        axes[0].plot(steps, [r["loss"] for r in tr], label=name, lw=1)
        axes[1].plot(steps, [r["grad_norm"] for r in tr], label=name, lw=1)
        axes[2].plot(steps, [r["u_max"] for r in tr], label=name, lw=1)
        axes[3].plot(steps, [r["mask_ratio"] for r in tr], label=name, lw=1)
    for ax, t in zip(axes, ["training loss (per-token NELBO)", "grad norm (pre-clip, log)", "u_max", "mask ratio"]):
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.axvline(warmup, color="gray", ls=":", lw=0.8)
        ax.legend()
    axes[1].set_yscale("log")
    fig.suptitle("Block-diffusion CPT of SmolLM2-135M-Instruct: u_max warmup vs none (dotted: end of warmup)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
