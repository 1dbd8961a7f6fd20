"""Tokens per forward against the confidence threshold for the embedded default: the demo request (marker filled
when its answer is correct) and HumanEval runs from benchmarks/eval_default_sweep.sh.

    python benchmarks/plot_default_sweep.py benchmarks/results/default_sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def threshold_of(summary: dict) -> float:
    t = summary["decoding"].get("threshold")
    return 1.0 if t is None else float(t)  # one token per step plotted at 1.0


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    demo = json.loads((args.folder / "demo_threshold_sweep.json").read_text())["rows"]
    xs = [1.0 if r["threshold"] is None else r["threshold"] for r in demo]
    ax.plot(xs, [r["tokens_per_forward"] for r in demo], color="tab:blue", label="demo request (chat, 256 tokens)")
    for x, r in zip(xs, demo):
        ax.scatter([x], [r["tokens_per_forward"]], s=60, color="tab:blue", zorder=3,
                   facecolors="tab:blue" if r["correct"] else "white")
    for style, colour in (("base", "tab:orange"), ("instruct", "tab:green")):
        runs = sorted((json.loads(f.read_text()) for f in args.folder.glob(f"he-{style}-th-*/summary.json")),
                      key=threshold_of)
        if runs:
            ax.plot([threshold_of(s) for s in runs], [s["tokens_per_forward"] for s in runs], "s-", color=colour,
                    label=f"HumanEval {style}, first {runs[0]['tasks']} tasks "
                          f"(passed: {', '.join(str(s['passed']) for s in runs)})")
    ax.axhline(1.5, color="grey", linestyle=":", label="goal: 1.5 tokens/forward")
    ax.set_xlabel("confidence threshold (1.0 = one token per step)")
    ax.set_ylabel("tokens per forward")
    ax.set_title("embedded default (provisional adapter), block 4, shift=False, CPU")
    ax.invert_xaxis()
    ax.legend(fontsize=8, loc="upper left")
    ax.text(0.99, 0.02, "demo marker filled = correct function", transform=ax.transAxes, ha="right", fontsize=8)
    fig.tight_layout()
    out = args.folder / "threshold_sweep.png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
