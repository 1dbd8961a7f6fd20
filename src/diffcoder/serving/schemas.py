"""Request bodies (OpenAI shapes plus the diffusion extras) and how they become decoder settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffcoder.errors import ConfigError
from diffcoder.settings import DecodeSettings, SettingError, flag_name


class APIError(Exception):
    """An error answered in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


INT64 = 2**63
MAX_TOP_LOGPROBS = 20
MAX_STOP_CHARS = 1000
MAX_STOP_STRINGS = 4

# OpenAI fields this server does not implement: refused with a 400 naming the field, unless they hold a value
# that asks for nothing (what clients send by default). Other unknown fields are ignored, as OpenAI does.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "this server has no tool calling"),
    "tool_choice": ((None, "none", "auto"), "this server has no tool calling"),
    "functions": ((None, []), "this server has no function calling"),
    "function_call": ((None, "none", "auto"), "this server has no function calling"),
    "response_format": ((None, {"type": "text"}), "structured output (JSON mode, JSON schema) is not implemented"),
    "logit_bias": ((None, {}), "logit_bias is not implemented"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not implemented"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not implemented"),
    "repetition_penalty": ((None, 1, 1.0), "penalties are not implemented"),
    "best_of": ((None, 1), "best_of is not implemented; use n"),
    "echo": ((None, False), "echo is not implemented"),
    "audio": ((None,), "audio output is not implemented"),
    "modalities": ((None, ["text"]), "only text output is implemented"),
    "prediction": ((None,), "predicted outputs are not implemented"),
    "min_p": ((None, 0, 0.0), "min_p is not implemented; use top_p or top_k"),
}


class DiffusionFields(BaseModel):
    """Fields shared by both endpoints. Types are strict: a string where a number belongs is a 400."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # nucleus filter at temperature > 0
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)  # int64, as OpenAI and torch take it
    user: str | None = None
    # diffusion extras (the checkpoint's generation_config.json gives the defaults)
    steps: int | None = Field(default=None, ge=1)
    steps_per_block: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1, le=1024)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    remasking: str | None = None  # checked by DecodeSettings (diffcoder.settings.REMASKING)
    # documented extension: also stream per-commit events (SSE event name "diffusion"); off by default
    diffusion_events: bool = False


class CompletionRequest(DiffusionFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None  # fill-in-the-middle: the text after the gap (the prompt is the text before it)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # k: the token's and k alternatives

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def refuse_not_implemented(body: dict[str, Any]) -> None:
    for name, (no_op, why) in NOT_IMPLEMENTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in no_op):
            raise APIError(400, f"{name} is not supported: {why}; leave it out", param=name,
                           code="unsupported_parameter")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings are at most {MAX_STOP_CHARS} characters long", param="stop")
    return stops


# Request fields named differently from the DecodeSettings key they set.
FIELD_OF = {"max_new_tokens": "max_tokens"}


def field_of(key: str) -> str:
    return FIELD_OF.get(key, key)


def request_settings(req: DiffusionFields, defaults: dict[str, Any], prompt_len: int,
                     context: int) -> DecodeSettings:
    """One prompt's settings: the request's values over the server's defaults (`server_defaults`), through
    `DecodeSettings.resolve`; a value that cannot work, or a canvas beyond the context, is a 400 naming its field.

    The answer is `settings.new_tokens` tokens at most (the canvas is rounded up to whole blocks). Without
    max_tokens, the default length shrinks to what the context leaves after the prompt."""
    user = {"max_new_tokens": req.max_tokens or req.max_completion_tokens, "steps": req.steps,
            "steps_per_block": req.steps_per_block, "block_length": req.block_length,
            "temperature": req.temperature, "remasking": req.remasking, "top_p": req.top_p,
            # -1 is OpenAI's "off" for top_k; an explicit null threshold: none, over the checkpoint's
            "top_k": None if req.top_k == -1 else req.top_k,
            "threshold": "none" if "threshold" in req.model_fields_set and req.threshold is None else req.threshold}
    settings = _resolve(user, defaults)
    B, room = settings.block_length, context - prompt_len
    if room < B:
        raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room to generate in the model's "
                       f"{context}-token context; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    if prompt_len + settings.canvas_length <= context:
        return settings
    if user["max_new_tokens"] is None:  # the default length, cut to the room left
        return _resolve({**user, "max_new_tokens": room // B * B}, defaults)
    raise APIError(400, f"max_tokens={settings.new_tokens} (a canvas of {settings.canvas_length} tokens in blocks of "
                   f"{B}) plus the prompt ({prompt_len} tokens) exceeds the model's context of {context} tokens; use "
                   f"max_tokens <= {room // B * B}", param="max_tokens", code="context_length_exceeded")


def _resolve(user: dict[str, Any], defaults: dict[str, Any]) -> DecodeSettings:
    try:
        return DecodeSettings.resolve(user, defaults, "serve", label=field_of,
                                      default_label=lambda k: f"the server's default {k}")
    except SettingError as exc:
        raise APIError(400, str(exc), param=field_of(exc.key or "")) from None


def server_defaults(checkpoint: dict[str, Any], flags: dict[str, Any], context: int) -> dict[str, Any]:
    """The defaults requests start from: the command line's decoding flags over the checkpoint's defaults
    (`read_generation_defaults`). Checked at start-up, each refusal naming the flag (or generation_config.json
    key) to change. A checkpoint's gen_length becomes the default max_tokens (a request's canvas is rounded up to
    whole blocks); --steps becomes steps per block (a request's canvas has its own number of blocks)."""
    given = {k: v for k, v in flags.items() if v is not None}

    def name(key: str) -> str:
        return flag_name(key) if key in given else f"{key} (generation_config.json)"

    try:
        settings = DecodeSettings.resolve(given, checkpoint, "serve")
    except SettingError as exc:
        key = exc.key or ""
        value = given.get(key, checkpoint.get(key))
        raise ConfigError(f"{name(key)} = {value!r}: {exc}" if key else str(exc)) from None
    if settings.canvas_length + 1 > context:
        key = "max_new_tokens" if "max_new_tokens" in given else "gen_length"
        raise ConfigError(f"{name(key)} = {settings.new_tokens}: a canvas of {settings.canvas_length} tokens and "
                          f"one prompt token exceed the model's context of {context} tokens; use at most "
                          f"{(context - 1) // settings.block_length * settings.block_length}")
    defaults = {**checkpoint, **given}
    if "max_new_tokens" not in given and checkpoint.get("gen_length") is not None:
        defaults["max_new_tokens"] = checkpoint["gen_length"]
    if "steps" in given:
        defaults["steps_per_block"] = settings.steps_per_block
        del defaults["steps"]
    return defaults
