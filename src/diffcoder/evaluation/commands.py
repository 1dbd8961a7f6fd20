"""`diffcoder eval humaneval|mbpp|humaneval-infilling|cruxeval|likelihood` and `diffcoder compare`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffcoder.errors import ConfigError

_HELP = {
    "humaneval": "pass@k on HumanEval",
    "mbpp": "pass@k on MBPP (sanitized)",
    "humaneval-infilling": "pass@k on HumanEval infilling (fill-in-the-middle, or the prefix-only baseline)",
    "cruxeval": "pass@k on CRUXEval-O (predict the output) or CRUXEval-I (predict an input)",
}
_STYLE_HELP = {
    "base": "base: continue the task prompt, cut at stop strings",
    "instruct": "instruct: chat template, code block extracted",
    "fim": "fim: prefix and suffix in the checkpoint's fill-in-the-middle layout, the middle generated",
    "prefix-only": "prefix-only: left-to-right completion of the prefix alone, the suffix appended (the baseline)",
}


def _add_benchmark_parser(sub, name: str) -> None:
    from diffcoder.commands import add_decoding_flags, add_model_flags
    from diffcoder.evaluation.benchmarks import BENCHMARKS

    bench = BENCHMARKS[name]
    p = sub.add_parser(name, help=_HELP[name])
    add_model_flags(p)
    if bench.variants:
        dest = bench.variant_flag.lstrip("-")
        p.add_argument(bench.variant_flag, dest="variant", required=True, metavar="|".join(bench.variants),
                       help=f"which {dest}: {', '.join(bench.variants)}")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--force", action="store_true", help="write the run into --out even if it holds other files")
    p.add_argument("--prompt-style", choices=bench.styles, default=bench.styles[0],
                   help="; ".join(_STYLE_HELP[s] for s in bench.styles) + f" (default: {bench.styles[0]})")
    if "prefix-only" in bench.styles:
        p.add_argument("--prefix-only", dest="prompt_style", action="store_const", const="prefix-only",
                       help="the same as --prompt-style prefix-only")
    p.add_argument("--limit", type=int, help="only the first N tasks")
    p.add_argument("--spread", type=int, metavar="N",
                   help="N tasks spread evenly over the (limited) list: a deterministic sample of a large split")
    p.add_argument("--samples", type=int, default=1, help="samples per task (pass@k for k <= samples)")
    p.add_argument("--ar", action="store_true",
                   help="autoregressive decoding (causal, KV cache): the AR baseline; without --model it runs on "
                        "the AR origin (smollm2-ar)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (with --api-base: requests "
                                                             "in flight together)")
    p.add_argument("--data", help=f"benchmark data: {bench.data_help}; default: the folder $DIFFCODER_DATA "
                                  "(../shared/data beside a source checkout, for development)")
    api = p.add_argument_group("evaluate a served model (OpenAI-compatible /v1/completions) instead of loading one")
    api.add_argument("--api-base", metavar="URL",
                     help="server base URL, e.g. http://127.0.0.1:8000/v1 (`diffcoder serve`, vLLM, ...)")
    api.add_argument("--api-model", help="model name to request (default: the first one /v1/models lists)")
    api.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY; never written to the run)")
    api.add_argument("--api-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--workers", type=int, default=0, help="test processes in parallel (default: CPU cores)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per test program (wall clock)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per test program")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="rerun the tests of finished records from their raw outputs (after an extraction change)")
    add_decoding_flags(p, "eval", seed_default=0, eos_flag=False)  # the harness stops at the tokenizer's EOS
    p.set_defaults(func=run_benchmark, benchmark=name)


def register(subparsers: argparse._SubParsersAction) -> None:
    from diffcoder.evaluation.benchmarks import BENCHMARKS

    p = subparsers.add_parser("eval", help="evaluate a checkpoint: HumanEval, MBPP, HumanEval infilling, CRUXEval, "
                                           "held-out likelihood")
    sub = p.add_subparsers(dest="eval_what", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        _add_benchmark_parser(sub, name)

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


def _api_decoding(args: argparse.Namespace) -> dict:
    """With --api-base: the decoding values given on the command line, for the request body (the server fills
    in the rest); greedy unless --temperature says otherwise."""
    from diffcoder.commands import user_decoding_values
    from diffcoder.evaluation.api_client import check_request_decoding
    from diffcoder.settings import DEFAULT_MAX_NEW_TOKENS

    user = {k: v for k, v in user_decoding_values(args).items() if v is not None and k != "seed"}
    user.setdefault("max_new_tokens", user.pop("gen_length", None) or DEFAULT_MAX_NEW_TOKENS["eval"])
    user.setdefault("temperature", 0.0)
    return check_request_decoding(user)


def run_benchmark(args: argparse.Namespace) -> int:
    from diffcoder.commands import check_device, model_argument
    from diffcoder.evaluation.harness import EvalConfig, format_summary, run_eval
    from diffcoder.loading import resolve_model
    from diffcoder.outputs import check_output_dir

    if args.samples > 1 and not args.temperature:
        print("note: --samples > 1 at temperature 0 repeats the same greedy answer", file=sys.stderr)
    check_device(args.device)
    check_output_dir(args.out, args.force, "write an eval run into it", ours=_is_eval_run)
    common = dict(
        benchmark=args.benchmark, variant=getattr(args, "variant", None), prompt_style=args.prompt_style,
        limit=args.limit, spread=args.spread, samples=args.samples, batch_size=args.batch_size, data=args.data,
        seed=args.seed, dtype=args.dtype, device=args.device, workers=args.workers, timeout_s=args.timeout,
        memory_mb=args.memory_mb,
    )
    if args.api_base:
        from diffcoder.evaluation.api_client import api_key, resolve_api_model

        if args.ar or args.model:
            raise ConfigError("--api-base evaluates the served model: leave out --model and --ar (the server "
                              "decides how it decodes), or drop --api-base to load a checkpoint here")
        key = api_key(args.api_key)
        model = resolve_api_model(args.api_base, args.api_model, key, args.api_timeout)
        cfg = EvalConfig(model=model, ar=False, decoding=_api_decoding(args), api_base=args.api_base, **common)
        cfg_extra = {"api_key": key, "api_timeout": args.api_timeout}
    else:
        model_path = resolve_model(model_argument(args))  # --ar without --model: the AR origin
        cfg = EvalConfig(model=str(model_path), ar=args.ar, decoding=_decoding_settings(args, model_path), **common)
        cfg_extra = {}
    summary = run_eval(cfg, args.out, progress=not args.no_progress, rescore=args.rescore, **cfg_extra)
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
