"""`diffcoder infill`: fill the gap of a file (a marker line, or a prefix file and a suffix file) and print it.

Registering only declares arguments; the model and decoder are imported when the command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffcoder.errors import DiffcoderError

DEFAULT_MARKER = "<FILL>"


def split_at_marker(text: str, marker: str = DEFAULT_MARKER, name: str = "the file") -> tuple[str, str]:
    """(prefix, suffix) around the one `marker` in `text`. A marker alone on its line (spaces around it allowed)
    stands for whole lines: its line break goes with it, so the middle fills whole lines; the indentation before it
    stays in the prefix. Elsewhere the marker is replaced exactly."""
    if not marker:
        raise DiffcoderError("--marker must not be empty")
    count = text.count(marker)
    if count != 1:
        lines = [i + 1 for i, line in enumerate(text.splitlines()) if marker in line]
        where = f" (lines {', '.join(map(str, lines[:10]))})" if lines else ""
        fix = (f"put {marker} once where the middle goes" if count == 0 else
               f"keep one {marker}: infill fills one gap at a time")
        raise DiffcoderError(f"{name} has {count} {marker} markers{where}; {fix} (or choose another marker with "
                             "--marker, or give --prefix-file and --suffix-file)")
    at = text.index(marker)
    prefix, rest = text[:at], text[at + len(marker):]
    line_start = prefix[prefix.rfind("\n") + 1:]
    line_end, newline, after = rest.partition("\n")
    if not line_start.strip() and not line_end.strip() and newline:
        return prefix, after  # a whole-line marker: the middle ends its own line
    return prefix, rest


def read_text(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        raise DiffcoderError(f"{what} {path} does not exist (or is not a file)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DiffcoderError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def gap(args: argparse.Namespace) -> tuple[str, str]:
    """(prefix, suffix) from FILE with a marker, or from --prefix-file/--suffix-file (a missing one is empty)."""
    pieces = args.prefix_file is not None or args.suffix_file is not None
    if args.file is not None and pieces:
        raise DiffcoderError("give FILE (with a marker) or --prefix-file/--suffix-file, not both")
    if args.file is not None:
        name = "stdin" if args.file == "-" else args.file
        return split_at_marker(read_text(args.file, "FILE"), args.marker, name)
    if not pieces:
        raise DiffcoderError(f"nothing to infill: give FILE with a {args.marker} marker where the middle goes, or "
                             "--prefix-file and --suffix-file")
    if args.prefix_file == "-" and args.suffix_file == "-":
        raise DiffcoderError("only one of --prefix-file and --suffix-file can read stdin (-)")
    prefix = read_text(args.prefix_file, "--prefix-file") if args.prefix_file is not None else ""
    suffix = read_text(args.suffix_file, "--suffix-file") if args.suffix_file is not None else ""
    return prefix, suffix


def cmd_infill(args: argparse.Namespace) -> int:
    from diffcoder.commands import DenoisingView, decode_settings, load_model
    from diffcoder.fim import infill_prompt_ids, require_fim_tokens
    from diffcoder.infilling import infill

    prefix, suffix = gap(args)
    loaded = load_model(args)
    model, tokenizer = loaded
    name = args.model or "the embedded default (smollm2)"
    fim = require_fim_tokens(tokenizer, name if tokenizer is not None else f"{name} (it has no tokenizer files)")
    settings = decode_settings(args, loaded, "generate")
    settings, drew = settings.with_seed()
    if drew:  # sampling without --seed: say which, so the output can be repeated
        print(f"seed: {settings.seed} (sampling; pass --seed {settings.seed} to repeat this output)", file=sys.stderr)
    view = None
    if args.show_denoising:
        view = DenoisingView(tokenizer, len(infill_prompt_ids(tokenizer, prefix, suffix, fim)),
                             settings.canvas_length + 8)
    res = infill(model, tokenizer, prefix, suffix, settings=settings, stop=args.stop, on_event=view)
    sys.stdout.write(res.middle if args.middle_only else res.text)
    sys.stdout.flush()
    if args.stats:
        print(json.dumps(res.stats), file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from diffcoder.commands import add_decoding_flags, add_model_flags

    p = subparsers.add_parser(
        "infill", help="fill the gap in a file (fill-in-the-middle) and print the completed file",
        description="Fill the gap between a prefix and a suffix with the checkpoint's FIM tokens and print "
                    "prefix + middle + suffix. The gap is a marker in FILE (a marker alone on its line stands for "
                    "whole lines), or the contents of --prefix-file and --suffix-file.")
    p.add_argument("file", nargs="?", help=f"a file with one marker where the middle goes (default marker "
                                           f"{DEFAULT_MARKER}; '-': stdin)")
    p.add_argument("--prefix-file", help="the code before the gap ('-': stdin)")
    p.add_argument("--suffix-file", help="the code after the gap ('-': stdin)")
    p.add_argument("--marker", default=DEFAULT_MARKER, help=f"the marker in FILE (default: {DEFAULT_MARKER})")
    p.add_argument("--middle-only", action="store_true", help="print only the generated middle")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end the middle before this string (repeatable); EOS and the checkpoint's end-of-middle "
                        "tokens always end it")
    add_model_flags(p)
    p.add_argument("--show-denoising", action="store_true", help="print the middle on stderr as it fills in")
    p.add_argument("--stats", action="store_true", help="print speed figures as JSON on stderr")
    add_decoding_flags(p, "generate")
    p.set_defaults(func=cmd_infill)


__all__ = ["register", "split_at_marker", "cmd_infill", "DEFAULT_MARKER"]
