"""What checking a checkpoint's manifest costs: the embedded default (135M parameters, float32) saved with a
manifest, then loaded with and without it, and the check alone (interleaved repeats, page cache warm).

    .venv/bin/python benchmarks/checkpoint_verify.py --out /tmp/verify-135m [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import diffcoder
from diffcoder.checkpoint import save_checkpoint
from diffcoder.manifest import MANIFEST, find_damage
from diffcoder.pull import ensure_default_model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(n: int, **fns) -> dict[str, list[float]]:
    """Each function n times, in turns, so machine load drifts over all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="scratch folder (replaced) for the saved copy")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model, tok = diffcoder.load(ensure_default_model())
    save_checkpoint(model, out / "with", tokenizer=tok)
    shutil.copytree(out / "with", out / "without")
    (out / "without" / MANIFEST).unlink()
    size = sum(f.stat().st_size for f in (out / "with").iterdir())
    t = interleaved(args.repeats, check=lambda: find_damage(out / "with"),
                    load_with=lambda: diffcoder.load(out / "with"),
                    load_without=lambda: diffcoder.load(out / "without"))
    med = {k: statistics.median(v) for k, v in t.items()}
    result = {"checkpoint_bytes": size, "repeats": args.repeats,
              **{f"{k}_s_median": round(v, 3) for k, v in med.items()},
              **{f"{k}_s_min": round(min(v), 3) for k, v in t.items()},
              "load_overhead_s_median": round(med["load_with"] - med["load_without"], 3),
              "check_GB_per_s": round(size / med["check"] / 1e9, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
