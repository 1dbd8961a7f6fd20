"""CLI: `diffcoder data build|sft`, `diffcoder train`, `diffcoder plot`, `diffcoder merge`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="build training data (packed token shards, SFT pairs)")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    b = dsub.add_parser("build", help="corpus -> tokenized, packed, memory-mapped shards with a held-out split")
    b.add_argument("sources", nargs="+", help="directories, globs, .jsonl/.parquet files, or 'python-env'")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--tokenizer", default="default", help="checkpoint dir, .gguf or 'default' (the embedded model)")
    b.add_argument("--val-fraction", type=float, default=0.01)
    b.add_argument("--max-tokens", type=int, default=None, help="stop after about this many tokens")
    b.add_argument("--max-files", type=int, default=None)
    b.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    b.add_argument("--fim-rate", type=float, default=0.0,
                   help="share of documents FIM-transformed (prefix/suffix/middle reordered; docs/design.md §2.8), e.g. 0.5")
    b.add_argument("--fim-seed", type=int, default=0, help="seed of the FIM draws (with each document's hash)")
    b.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    b.set_defaults(func=cmd_data_build)
    s = dsub.add_parser("sft", help="chat JSONL (or --mine: functions of a code corpus) -> SFT token pairs")
    s.add_argument("sources", nargs="+", help="chat JSONL files; with --mine: code sources as for `data build`")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", default="default")
    s.add_argument("--mine", action="store_true", help="mine (signature+docstring -> function) pairs from code")
    s.add_argument("--val-fraction", type=float, default=0.02)
    s.add_argument("--max-pairs", type=int, default=None)
    s.add_argument("--max-files", type=int, default=None)
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="keep only the last N tokens of longer prompts (so a row of data.seq_len still holds the "
                        "response)")
    s.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    s.set_defaults(func=cmd_data_sft)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = subparsers.add_parser("train", help="block-diffusion CPT / SFT from a YAML recipe")
    t.add_argument("config", help="a YAML file or a shipped recipe: cpt, sft, cpt-small, sft-small, "
                                  "lora-sft-small, cpt-default, sft-default")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 optim.lr=3e-5")
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--force", action="store_true",
                   help="start a run in a non-empty train.out_dir that holds no run (its files stay)")
    t.set_defaults(func=cmd_train)

    pl = subparsers.add_parser("plot", help="plot a run's loss, grad norm, u_max and mask ratio to PNG")
    pl.add_argument("runs", nargs="+", help="run directories (several: drawn on the same axes)")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/training.png)")
    pl.add_argument("--force", action="store_true", help="overwrite --out even if it is not a plot of ours")
    pl.set_defaults(func=cmd_plot)

    m = subparsers.add_parser("merge", help="merge a LoRA adapter into its base -> a full checkpoint")
    m.add_argument("adapter", help="adapter directory (has adapter_config.json)")
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true", help="replace --out even if it is not empty")
    m.set_defaults(func=cmd_merge)


def cmd_data_build(args: argparse.Namespace) -> int:
    from diffcoder.outputs import check_output_dir
    from diffcoder.training.data import build_corpus, load_tokenizer

    check_output_dir(args.out, args.force, "write dataset files into it")
    tok = load_tokenizer(args.tokenizer)
    idx = build_corpus(args.sources, tok, args.out, val_fraction=args.val_fraction, max_tokens=args.max_tokens,
                       max_files=args.max_files, text_field=args.text_field, tokenizer_spec=args.tokenizer,
                       fim_rate=args.fim_rate, fim_seed=args.fim_seed)
    print(json.dumps(idx["summary"], indent=2))
    return 0


def cmd_data_sft(args: argparse.Namespace) -> int:
    from diffcoder.outputs import check_output_dir
    from diffcoder.training.data import build_sft, load_tokenizer

    check_output_dir(args.out, args.force, "write dataset files into it")
    tok = load_tokenizer(args.tokenizer)
    idx = build_sft(args.sources, tok, args.out, val_fraction=args.val_fraction, mine=args.mine,
                    max_pairs=args.max_pairs, max_files=args.max_files, tokenizer_spec=args.tokenizer,
                    max_prompt_tokens=args.max_prompt_tokens)
    print(json.dumps(idx["summary"], indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffcoder.training.config import load_config
    from diffcoder.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, quiet=args.quiet, force=args.force)
    print(json.dumps({k: result[k] for k in ("eval", "checkpoint", "final")}, indent=2), file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffcoder.outputs import check_output_file, is_our_png
    from diffcoder.training.plot import plot_runs

    out = args.out or str(Path(args.runs[0]) / "training.png")
    check_output_file(out, args.force, ours=is_our_png)  # a plot of ours is redrawn; anything else is kept
    print(plot_runs(args.runs, out))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from diffcoder.loading import merge_adapter
    from diffcoder.outputs import check_output_dir

    check_output_dir(args.out, args.force, "replace it with the merged checkpoint")
    print(merge_adapter(args.adapter, args.out))
    return 0
