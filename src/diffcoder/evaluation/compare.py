"""`diffcoder compare`: pass@1, tokens/s and tokens per forward of several runs, as a table and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from diffcoder.errors import ConfigError

COLUMNS = [("run", "run"), ("benchmark", "benchmark"), ("prompts", "prompt_style"), ("mode", "mode"),
           ("tasks", "tasks"), ("pass@1", "pass@1"), ("tok/s", "tokens_per_second"),
           ("tok/fwd", "tokens_per_forward"), ("forwards", "forwards"), ("batch", "batch_size"),
           ("decoding", "decoding")]


def compare_runs(run_dirs: list[str | Path]) -> list[dict]:
    """One row per run directory (its summary.json); a missing summary is a clear error."""
    rows = []
    for d in run_dirs:
        f = Path(d) / "summary.json"
        if not f.is_file():
            raise ConfigError(f"{d} has no summary.json: is it a `diffcoder eval` run directory (--out)? "
                              "Rerun that eval command to finish it")
        s = json.loads(f.read_text())
        dec = {k: v for k, v in s.get("decoding", {}).items() if k != "mode"}
        rows.append({
            "run": Path(d).resolve().name, "benchmark": s["benchmark"], "prompt_style": s["prompt_style"],
            "mode": s["mode"], "tasks": s["tasks"], "pass@1": s["pass_at_k"].get("pass@1", 0.0),
            "tokens_per_second": s["tokens_per_second"], "tokens_per_forward": s["tokens_per_forward"],
            "forwards": s["forwards"], "batch_size": s["batch_size"],
            "decoding": ", ".join(f"{k}={v}" for k, v in dec.items()), "device": s.get("device", ""),
        })
    return rows


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict]) -> str:
    """A Markdown table (reads well in a terminal and pastes into docs)."""
    head = [h for h, _ in COLUMNS]
    body = [[_fmt(r[k]) for _, k in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def plot_runs(rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [r["run"] for r in rows]
    metrics = [("pass@1", "pass@1"), ("tokens_per_second", "generated tokens/s"),
               ("tokens_per_forward", "tokens per forward")]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.1 * len(rows) * 3), 4))
    colours = ["#4c72b0" if r["mode"] == "ar" else "#dd8452" for r in rows]
    for ax, (key, title) in zip(axes, metrics):
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colours)
        ax.set_title(title)
        ax.set_ylim(0, max(max(values) * 1.25, 0.05 if key == "pass@1" else 1e-9))
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
    fig.suptitle("blue: AR baseline, orange: block diffusion", fontsize=9)
    fig.tight_layout()
    from diffcoder.outputs import png_metadata

    fig.savefig(path, dpi=120, metadata=png_metadata())
    plt.close(fig)
    return path
