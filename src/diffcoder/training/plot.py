"""`diffcoder plot RUN_DIR`: loss, gradient norm, u_max and mask ratio of a run's log.jsonl as one PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcoder.errors import DiffcoderError


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    f = Path(run_dir) / "log.jsonl"
    if not f.is_file():
        raise DiffcoderError(f"{run_dir} has no log.jsonl; give the train.out_dir of a run")
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """One figure with four panels; several runs are drawn on the same axes (for ablations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("loss", "training loss (per-token NELBO)", False), ("grad_norm", "grad norm (pre-clip)", True),
              ("u_max", "u_max (corruption cap)", False), ("mask_ratio", "mask ratio", False),
              ("lr", "learning rate", False)]
    for i, run in enumerate(run_dirs):
        recs = read_log(run)
        train = [r for r in recs if r.get("kind", "train") == "train"]
        evals = [r for r in recs if r.get("kind") == "eval"]
        label = labels[i] if labels else Path(run).name
        for ax, (key, title, logy) in zip(axes.flat, panels):
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=label, lw=1)
            ax.set_title(title)
            ax.set_xlabel("step")
            if logy:
                ax.set_yscale("log")
        ax = axes.flat[5]
        for key, style in (("eval_nelbo", "-o"), ("eval_ar_nll", "--s")):
            pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]  # null: nothing scored
            if pts:
                ax.plot(*zip(*pts), style, label=f"{label} {key}", ms=3)
        ax.set_title("held-out NELBO / AR NLL")
        ax.set_xlabel("step")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from diffcoder.outputs import png_metadata

    fig.savefig(out, dpi=100, metadata=png_metadata())
    plt.close(fig)
    return out
