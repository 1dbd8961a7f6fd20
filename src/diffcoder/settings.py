"""Decoding settings: every value a decode needs, their defaults (written once, here) and their checks.

`DecodeSettings.resolve(user, checkpoint_defaults, command)` merges, in order of precedence, the values a user gave
(CLI flags, a request body), the checkpoint's defaults (`checkpoint.read_generation_defaults`: its
generation_config.json plus the block size and shift of its config) and the built-in defaults below, then
validates the result once. Each error names the value, where it came from and what to use instead.

The decoder (`diffcoder.decoding.generate`) keeps its own checks, so the official `model.generate(...)` call works
unchanged without this module; everything else goes through it: the CLI (`generate`, `demo`, `infill`, `eval`),
`diffcoder.infill`, and the server, which builds each request's settings with `DecodeSettings.resolve(body_values,
server_defaults, command="serve", label=...)` (a `SettingError` from it is a 400 naming `.key`'s field).
`steps_per_block` is accepted everywhere as an alternative to `steps`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from diffcoder.errors import DecodingError

REMASKING = ("low_confidence", "random")  # the first is the default
# The decoding values a checkpoint's generation_config.json may set.
CHECKPOINT_KEYS = ("steps", "gen_length", "block_length", "threshold", "remasking", "temperature", "shift")
# Values that only mean something to block diffusion; plain AR decoding (--ar) refuses them.
DIFFUSION_ONLY = ("steps", "block_length", "remasking", "threshold", "shift", "steps_per_block")
# Values the AR baseline's decoder (`decoding.generate_ar`) has no use for yet.
AR_UNSUPPORTED = ("top_k", "top_p")
# Values a defaults layer (the checkpoint's, or a server's command line) may set, besides the length and steps.
DEFAULTABLE = ("block_length", "temperature", "remasking", "threshold", "shift", "top_k", "top_p")
# Tokens to generate when neither the user nor the checkpoint says: per command (benchmark answers run longer).
# The demo stops at 128: the default does not end its turn by itself yet (no SFT), and under block-causal attention a
# longer budget changes nothing before that point.
DEFAULT_MAX_NEW_TOKENS = {"generate": 256, "demo": 128, "eval": 384, "serve": 128}
DEFAULT_BLOCK_LENGTH = 4  # the paper's B, for a checkpoint that records none
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def flag_name(key: str) -> str:
    """How the CLI spells a settings key: block_length -> --block-length."""
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class DecodeSettings:
    """One decode's settings. Give `max_new_tokens` (the canvas is rounded up to whole blocks and the answer
    trimmed) or `gen_length` (the official canvas length, a multiple of `block_length`), not both."""

    max_new_tokens: int | None = None
    gen_length: int | None = None
    steps: int | None = None  # denoising steps in total; None: one token per step
    block_length: int = DEFAULT_BLOCK_LENGTH
    temperature: float = 0.0  # 0: greedy
    remasking: str = REMASKING[0]  # which slots commit first: low_confidence (softmax probability) or random
    threshold: float | None = None  # commit every slot at least this confident (parallel decoding)
    shift: bool = False  # logits at i-1 predict token i (Dream style)
    eos_id: int | None = None  # None: the tokenizer's; -1: never stop early
    seed: int | None = None  # None with sampling: `with_seed()` draws one
    top_k: int | None = None  # sampling filter (temperature > 0): keep the k likeliest tokens; None or 0: off
    top_p: float | None = None  # sampling filter (temperature > 0): nucleus mass; None or 1: off

    # ------------------------------------------------------------------------------------------ derived

    @property
    def canvas_length(self) -> int:
        """Generated slots on the canvas: gen_length, or max_new_tokens rounded up to whole blocks."""
        if self.gen_length is not None:
            return self.gen_length
        return -(-self.max_new_tokens // self.block_length) * self.block_length

    @property
    def new_tokens(self) -> int:
        """Tokens the caller gets back at most."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.gen_length

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.canvas_length

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // (self.canvas_length // self.block_length)

    @property
    def sampling(self) -> bool:
        """Whether the output depends on random draws (and so on the seed)."""
        return self.temperature > 0 or self.remasking == "random"

    def batch_key(self) -> DecodeSettings:
        """What rows decoded together in one batch must share: everything but the seed (each row has its own)
        and the end token (the batch's); the sampling filters only where they change the draw (temperature > 0)."""
        filters = {} if self.temperature > 0 else {"top_k": None, "top_p": None}
        return replace(self, seed=None, eos_id=None, **filters)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def resolve(cls, user: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, command: str = "generate",
                label: Callable[[str], str] = flag_name,
                default_label: Callable[[str], str] | None = None) -> DecodeSettings:
        """Merge user values (None = not given) over `defaults` (the checkpoint's, perhaps with a server's
        command line over them) over the built-in ones; validate once.

        `label(key)` is how errors name a user value (a CLI flag by default, a JSON field for the server);
        `default_label(key)`, a value from `defaults` (by default: the checkpoint's generation_config.json)."""
        user = {k: v for k, v in user.items() if v is not None}
        defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
        unknown = sorted(set(user) - set(KEYS))
        if unknown:
            raise DecodingError(f"unknown decoding setting(s) {unknown}; known: {', '.join(KEYS)}")
        from_defaults = default_label or (lambda k: _from_checkpoint(k, label))
        origin = {k: label(k) for k in user}
        values: dict[str, Any] = {}
        for k in DEFAULTABLE:
            if k in user:  # threshold "none": explicitly no threshold, over a checkpoint's
                values[k] = None if (k == "threshold" and user[k] == "none") else user[k]
            elif k in defaults:
                values[k] = None if (k == "threshold" and defaults[k] == "none") else defaults[k]
                origin[k] = from_defaults(k)
        for k in ("top_k", "top_p"):  # the off values of the filters are spelled one way: None
            if values.get(k) in ((0,) if k == "top_k" else (1, 1.0)) and not isinstance(values[k], bool):
                values[k] = None
        values.update({k: user[k] if k in user else defaults[k] for k in ("eos_id", "seed")
                       if k in user or k in defaults})
        values.update(_length(user, defaults, command, label, origin, from_defaults))
        block = values.get("block_length", DEFAULT_BLOCK_LENGTH)
        values.update(_steps(user, defaults, values, block, label, origin, from_defaults))
        settings = cls(**values)
        settings.validate(lambda k: origin.get(k) or label(k))
        return settings

    @classmethod
    def resolve_ar(cls, user: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                   command: str = "generate", label: Callable[[str], str] = flag_name,
                   extra_flags: list[str] | tuple[str, ...] = ()) -> DecodeSettings:
        """Settings for plain AR decoding (the baseline): block 1 with shift, which is exactly causal decoding.

        Diffusion-only values the user gave are refused in one line (with `extra_flags`, other such flags of the
        caller); the checkpoint's are ignored. A gen_length counts as max_new_tokens (no blocks to fill)."""
        unsupported = [label(k) for k in AR_UNSUPPORTED if user.get(k) is not None]
        if unsupported:
            raise DecodingError(f"AR decoding (--ar) has no top-k/top-p filter; drop {' and '.join(unsupported)}, "
                                f"or drop --ar")
        given = [label(k) for k in DIFFUSION_ONLY if user.get(k) is not None] + list(extra_flags)
        if given:
            them = given[0] if len(given) == 1 else ", ".join(given[:-1]) + " and " + given[-1]
            raise DecodingError(f"AR decoding (--ar) commits one token per forward, so {them} "
                                f"{'does' if len(given) == 1 else 'do'} not apply; drop {them}, or drop --ar")
        user = dict(user)
        defaults = {k: v for k, v in (defaults or {}).items() if k not in DIFFUSION_ONLY + AR_UNSUPPORTED}
        for d in (user, defaults):
            if d.get("gen_length") is not None and d.get("max_new_tokens") is None:
                d["max_new_tokens"] = d.pop("gen_length")
        return cls.resolve({**user, "block_length": 1, "shift": True}, defaults, command, label)

    def with_seed(self) -> tuple[DecodeSettings, bool]:
        """(settings, drew): a sampling decode without a seed gets a fresh random one, so it can be reproduced."""
        if self.seed is not None or not self.sampling:
            return self, False
        return replace(self, seed=secrets.randbelow(2**31)), True

    # ------------------------------------------------------------------------------------------ checks

    def validate(self, name: Callable[[str], str] = lambda k: k) -> None:
        """Raise DecodingError naming the first value that cannot work; `name(key)` says where it came from."""
        B = self.block_length
        _require(_is_int(B) and B >= 1, f"{name('block_length')} must be a whole number >= 1, got {B!r}",
                 "block_length")
        _require(isinstance(self.shift, bool), f"{name('shift')} must be true or false, got {self.shift!r}", "shift")
        _require(self.remasking in REMASKING,
                 f"{name('remasking')} must be one of {', '.join(REMASKING)}, got {self.remasking!r}", "remasking")
        t = self.temperature
        _require(_is_number(t) and math.isfinite(t) and t >= 0,
                 f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {t!r}", "temperature")
        tau = self.threshold
        _require(tau is None or (_is_number(tau) and 0 < tau <= 1),
                 f"{name('threshold')} must be in (0, 1] (or unset for a fixed number of commits per step), "
                 f"got {tau!r}", "threshold")
        _require(self.eos_id is None or (_is_int(self.eos_id) and self.eos_id >= -1),
                 f"{name('eos_id')} must be a token id, or -1 to never stop early, got {self.eos_id!r}", "eos_id")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
                 f"{name('seed')} must be a whole number in [0, 2**64), got {self.seed!r}", "seed")
        _require(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0),
                 f"{name('top_k')} must be a whole number >= 1 (0: off), got {self.top_k!r}", "top_k")
        p = self.top_p
        _require(p is None or (_is_number(p) and 0 < p <= 1), f"{name('top_p')} must be in (0, 1], got {p!r}",
                 "top_p")
        self._validate_length(name)
        self._validate_steps(name)

    def _validate_length(self, name: Callable[[str], str]) -> None:
        B, G, M = self.block_length, self.gen_length, self.max_new_tokens
        _require((G is None) != (M is None), "give either gen_length or max_new_tokens, not both", "max_new_tokens")
        if M is not None:
            _require(_is_int(M) and M >= 1, f"{name('max_new_tokens')} must be a whole number >= 1, got {M!r}",
                     "max_new_tokens")
            return
        _require(_is_int(G) and G >= B and G % B == 0,
                 f"{name('gen_length')} ({G!r}) must be a positive multiple of block_length ({B}); try "
                 f"{_nearest_multiples(G, B)}, or use {name('max_new_tokens')}, which rounds up to whole blocks",
                 "gen_length")

    def _validate_steps(self, name: Callable[[str], str]) -> None:
        if self.steps is None:
            return
        n_blocks = self.canvas_length // self.block_length
        S = self.steps
        _require(_is_int(S) and S >= 1 and S % n_blocks == 0,
                 f"{name('steps')} ({S!r}) must be a positive multiple of the number of blocks ({n_blocks} = "
                 f"{self.canvas_length} slots / block_length {self.block_length}) so every block gets the same "
                 f"steps; try steps={_nearest_multiples(S, n_blocks)}", "steps")
        _require(S <= self.canvas_length,
                 f"{name('steps')} ({S}) is more than the {self.canvas_length} slots to fill: a step beyond one "
                 f"token per step commits nothing; use steps <= {self.canvas_length}", "steps")

    # ------------------------------------------------------------------------------------------ use

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `decoding.generate` (unset optional values left out)."""
        kw: dict[str, Any] = {"block_length": self.block_length, "temperature": self.temperature,
                              "remasking": self.remasking, "shift": self.shift}
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        else:
            kw["gen_length"] = self.gen_length
        for k in ("steps", "threshold", "eos_id", "top_k", "top_p"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        return kw

    def ar_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `decoding.generate_ar` (the AR baseline has no blocks or steps)."""
        kw: dict[str, Any] = {"max_new_tokens": self.new_tokens, "temperature": self.temperature}
        if self.eos_id is not None:
            kw["eos_id"] = self.eos_id
        return kw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _length(user: Mapping[str, Any], defaults: Mapping[str, Any], command: str, label: Callable[[str], str],
            origin: dict[str, str], from_defaults: Callable[[str], str]) -> dict[str, Any]:
    """gen_length or max_new_tokens: the user's (one of them), else the defaults' (max_new_tokens first: a
    server's --max-new-tokens over the checkpoint's gen_length), else the command's default max_new_tokens."""
    if "gen_length" in user and "max_new_tokens" in user:
        raise SettingError(f"give either {label('gen_length')} or {label('max_new_tokens')}, not both",
                           "max_new_tokens")
    for k in ("max_new_tokens", "gen_length"):
        if k in user:
            return {k: user[k]}
    for k in ("max_new_tokens", "gen_length"):
        if k in defaults:
            origin[k] = from_defaults(k)
            return {k: defaults[k]}
    return {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS.get(command, DEFAULT_MAX_NEW_TOKENS["generate"])}


def _steps(user: Mapping[str, Any], defaults: Mapping[str, Any], values: Mapping[str, Any], block: int,
           label: Callable[[str], str], origin: dict[str, str], from_defaults: Callable[[str], str]) -> dict[str, Any]:
    """Total steps: the user's (or steps_per_block x blocks), else the defaults' steps_per_block (at most the
    block), else the checkpoint's steps per block carried over to this canvas, else None (one token per step)."""
    if "steps" in user and "steps_per_block" in user:
        raise SettingError(f"give either {label('steps')} or {label('steps_per_block')}, not both", "steps")
    if not (_is_int(block) and block >= 1):
        return {}  # validate() reports the block length
    probe = DecodeSettings(**{k: v for k, v in values.items() if k in ("max_new_tokens", "gen_length")},
                           block_length=block)
    if not _is_int(probe.new_tokens):
        return {}
    n_blocks = max(1, probe.canvas_length // block)
    if "steps" in user:
        return {"steps": user["steps"]}
    if "steps_per_block" in user:
        S = user["steps_per_block"]
        _require(_is_int(S) and 1 <= S <= block,
                 f"{label('steps_per_block')} must be between 1 and block_length ({block}), got {S!r}; more "
                 f"steps than slots commit nothing", "steps_per_block")
        origin["steps"] = label("steps_per_block")
        return {"steps": S * n_blocks}
    if _is_int(defaults.get("steps_per_block")) and defaults["steps_per_block"] >= 1:
        origin["steps"] = from_defaults("steps_per_block")
        return {"steps": min(block, defaults["steps_per_block"]) * n_blocks}
    G, S_total, B0 = defaults.get("gen_length"), defaults.get("steps"), defaults.get("block_length", block)
    if _is_int(G) and _is_int(S_total) and _is_int(B0) and B0 >= 1 and G >= B0 and S_total % (G // B0) == 0:
        per_block = min(block, max(1, S_total // (G // B0)))
        origin["steps"] = from_defaults("steps")
        return {"steps": per_block * n_blocks}
    return {}


def _from_checkpoint(key: str, label: Callable[[str], str]) -> str:
    return f"{key} (from the checkpoint's generation_config.json; override it with {label(key)})"


class SettingError(DecodingError):
    """A decoding value that cannot work; `key` is the setting it names (the server answers with its field)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _require(ok: bool, message: str, key: str | None = None) -> None:
    if not ok:
        raise SettingError(message, key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _nearest_multiples(value: Any, of: int) -> str:
    if not _is_int(value):
        return f"a multiple of {of}"
    lo = value // of * of
    return " or ".join(str(c) for c in dict.fromkeys((lo, lo + of)) if c >= of)


KEYS = (*DecodeSettings.__dataclass_fields__, "steps_per_block")  # what resolve() takes

__all__ = ["DecodeSettings", "SettingError", "REMASKING", "CHECKPOINT_KEYS", "DIFFUSION_ONLY", "DEFAULT_MAX_NEW_TOKENS",
           "KEYS", "flag_name"]
