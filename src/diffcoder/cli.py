"""The `diffcoder` command line.

Each area registers its own subcommands from its own module (a `register(subparsers)` function), so the
model, training, evaluation and serving code stay separate and this file stays a short index.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffcoder.errors import DiffcoderError

# Modules that add subcommands; each defines register(subparsers: argparse._SubParsersAction) -> None.
COMMAND_MODULES = [
    "diffcoder.commands",  # generate, convert, info, pull, demo
    "diffcoder.training.commands",  # data, train, plot, merge
    "diffcoder.evaluation.commands",  # eval, compare
    "diffcoder.serving.commands",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    from diffcoder import __version__

    parser = argparse.ArgumentParser(prog="diffcoder", description="Block-diffusion code language models.")
    parser.add_argument("--version", action="version", version=f"diffcoder {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that area is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DiffcoderError as exc:
        print(f"diffcoder: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffcoder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
