"""`diffcoder eval humaneval|mbpp|likelihood` and `diffcoder compare`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffcoder.errors import ConfigError


def _add_benchmark_parser(sub, name: str) -> None:
    from diffcoder.commands import add_decoding_flags, add_model_flags

    p = sub.add_parser(name, help=f"pass@k on {'HumanEval' if name == 'humaneval' else 'MBPP (sanitized)'}")
    add_model_flags(p)
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--force", action="store_true", help="write the run into --out even if it holds other files")
    p.add_argument("--prompt-style", choices=["base", "instruct"], default="base",
                   help="base: continue the task prompt; instruct: chat template, code block extracted")
    p.add_argument("--limit", type=int, help="only the first N tasks")
    p.add_argument("--samples", type=int, default=1, help="samples per task (pass@k for k <= samples)")
    p.add_argument("--ar", action="store_true",
                   help="autoregressive decoding (causal, KV cache): the AR baseline; without --model it runs on "
                        "the AR origin (smollm2-ar)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--data", help="benchmark file or folder (MBPP: sanitized-mbpp.json; default: "
                                  "$DIFFCODER_DATA or ../shared/data next to the repository)")
    p.add_argument("--workers", type=int, default=0, help="test processes in parallel (default: CPU cores)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (wall clock)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per test program")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="rerun the tests of finished records from their raw outputs (after an extraction change)")
    add_decoding_flags(p, "eval", seed_default=0, eos_flag=False)  # the harness stops at the tokenizer's EOS
    p.set_defaults(func=run_benchmark, benchmark=name)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: HumanEval, MBPP, held-out likelihood")
    sub = p.add_subparsers(dest="eval_what", metavar="BENCHMARK", required=True)
    _add_benchmark_parser(sub, "humaneval")
    _add_benchmark_parser(sub, "mbpp")

    from diffcoder.commands import add_model_flags

    lk = sub.add_parser("likelihood", help="held-out diffusion NELBO and AR NLL per token")
    add_model_flags(lk)
    lk.add_argument("--data", required=True,
                    help="held-out text: a .txt/.jsonl/.py file, a folder of them, or a training shard folder")
    lk.add_argument("--seq-len", type=int, default=512, help="tokens per scored sequence")
    lk.add_argument("--max-tokens", type=int, default=65536, help="score at most this many tokens")
    lk.add_argument("--t-grid", type=int, default=8, help="number of noise levels t in the fixed grid")
    lk.add_argument("--block-length", dest="block_size", type=int, help="block size B (default: the checkpoint's)")
    lk.add_argument("--block-size", dest="block_size", type=int, help=argparse.SUPPRESS)  # the old spelling
    lk.add_argument("--batch-size", type=int, default=4)
    lk.add_argument("--seed", type=int, default=0, help="seed for the masks")
    lk.add_argument("--out", help="write the result as JSON here")
    lk.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    lk.set_defaults(func=run_likelihood)

    c = subparsers.add_parser("compare", help="one table and bar chart of several eval runs")
    c.add_argument("runs", nargs="+", help="run directories written by `diffcoder eval`")
    c.add_argument("--plot", help="bar chart PNG (default: compare.png in the first run's parent folder)")
    c.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    c.add_argument("--force", action="store_true", help="overwrite --plot even if it is not a chart of ours")
    c.set_defaults(func=run_compare)


def _decoding_settings(args: argparse.Namespace, model_path: Path) -> dict:
    """The run's decoding keyword arguments (recorded in the run's identity), through DecodeSettings."""
    from diffcoder.checkpoint import read_generation_defaults
    from diffcoder.commands import user_decoding_values
    from diffcoder.settings import DecodeSettings

    user = {k: v for k, v in user_decoding_values(args).items() if k != "seed"}  # the seed is EvalConfig.seed
    defaults = read_generation_defaults(model_path)
    if args.ar:
        return DecodeSettings.resolve_ar(user, defaults, "eval").ar_kwargs()
    return DecodeSettings.resolve(user, defaults, "eval").generate_kwargs()


def _is_eval_run(path: Path) -> bool:
    """A folder an earlier `diffcoder eval` wrote (it resumes there)."""
    try:
        return "benchmark" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def run_benchmark(args: argparse.Namespace) -> int:
    from diffcoder.commands import check_device, model_argument
    from diffcoder.evaluation.harness import EvalConfig, format_summary, run_eval
    from diffcoder.loading import resolve_model
    from diffcoder.outputs import check_output_dir

    if args.samples > 1 and not args.temperature:
        print("note: --samples > 1 at temperature 0 repeats the same greedy answer", file=sys.stderr)
    check_device(args.device)
    check_output_dir(args.out, args.force, "write an eval run into it", ours=_is_eval_run)
    model_path = resolve_model(model_argument(args))  # --ar without --model: the AR origin
    cfg = EvalConfig(
        benchmark=args.benchmark, model=str(model_path), prompt_style=args.prompt_style, limit=args.limit,
        samples=args.samples, ar=args.ar, decoding=_decoding_settings(args, model_path),
        batch_size=args.batch_size, data=args.data, seed=args.seed, dtype=args.dtype, device=args.device,
        workers=args.workers, timeout_s=args.timeout, memory_mb=args.memory_mb,
    )
    summary = run_eval(cfg, args.out, progress=not args.no_progress, rescore=args.rescore)
    print(format_summary(summary))
    print(f"records: {Path(args.out) / 'tasks.jsonl'}  summary: {Path(args.out) / 'summary.json'}")
    return 0


def run_likelihood(args: argparse.Namespace) -> int:
    from diffcoder.commands import load_model
    from diffcoder.evaluation.likelihood import evaluate_likelihood, load_token_sequences
    from diffcoder.outputs import check_output_file

    if args.out:
        check_output_file(args.out, args.force)
    if args.block_size is not None and args.block_size < 1:
        raise ConfigError(f"--block-length must be >= 1, got {args.block_size}")
    model, tokenizer = load_model(args)
    seqs = load_token_sequences(args.data, tokenizer, args.seq_len, args.max_tokens)
    result = evaluate_likelihood(model, seqs, block_size=args.block_size, t_points=args.t_grid,
                                 batch_size=args.batch_size, seed=args.seed)
    result["model"] = args.model or "smollm2"
    result["data"] = args.data
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from diffcoder.evaluation.compare import compare_runs, format_table, plot_runs
    from diffcoder.outputs import check_output_file, is_our_png

    plot = Path(args.plot) if args.plot else Path(args.runs[0]).resolve().parent / "compare.png"
    check_output_file(plot, args.force, ours=is_our_png)  # a chart of ours is redrawn; anything else is kept
    rows = compare_runs(args.runs)
    if not rows:
        raise ConfigError("no run had a summary.json; run `diffcoder eval ...` first")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    plot_runs(rows, plot)
    print(f"chart: {plot}", file=sys.stderr)
    return 0
