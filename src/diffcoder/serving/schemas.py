"""Request bodies (OpenAI shapes plus the diffusion extras) and how they become decoder settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffcoder.serving.engine import DecodeSettings


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
    remasking: Literal["low_confidence", "random"] | None = None
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


def resolve_settings(req: DiffusionFields, defaults: dict[str, Any], prompt_len: int, context: int,
                     native_block: int) -> tuple[DecodeSettings, int]:
    """(batch-wide settings, max_tokens) for one prompt, with the checkpoint's defaults filled in.

    Defaults: block_length and temperature/threshold/remasking from generation_config.json; steps per block
    from its steps and gen_length (steps / (gen_length / block_length)), else one token per step."""
    B = req.block_length or int(defaults.get("block_length") or native_block)
    temperature = req.temperature if req.temperature is not None else float(defaults.get("temperature") or 0.0)
    threshold = req.threshold if "threshold" in req.model_fields_set else defaults.get("threshold")
    remasking = req.remasking or defaults.get("remasking") or "low_confidence"
    if remasking not in ("low_confidence", "random"):
        raise APIError(400, f"remasking must be 'low_confidence' or 'random', got {remasking!r}", param="remasking")

    max_tokens = req.max_tokens or req.max_completion_tokens
    room = context - prompt_len
    if room < B:
        raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room to generate in the model's "
                       f"{context}-token context; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(int(defaults.get("max_tokens") or defaults.get("gen_length") or 128), room // B * B)
    gen_length = -(-max_tokens // B) * B  # the canvas covers whole blocks; the answer is trimmed
    if prompt_len + gen_length > context:
        raise APIError(400, f"max_tokens={max_tokens} (a canvas of {gen_length} tokens in blocks of {B}) plus the "
                       f"prompt ({prompt_len} tokens) exceeds the model's context of {context} tokens; use "
                       f"max_tokens <= {room // B * B}", param="max_tokens", code="context_length_exceeded")
    n_blocks = gen_length // B
    if req.steps is not None and req.steps_per_block is not None:
        raise APIError(400, "give either steps or steps_per_block, not both", param="steps")
    if req.steps is not None:
        if req.steps % n_blocks:
            lo = max(n_blocks, req.steps // n_blocks * n_blocks)
            raise APIError(400, f"steps ({req.steps}) must be a multiple of the number of blocks ({n_blocks} = "
                           f"ceil(max_tokens / block_length)) so every block gets the same steps; try steps={lo} "
                           f"or pass steps_per_block", param="steps")
        S = req.steps // n_blocks
    elif req.steps_per_block is not None:
        S = req.steps_per_block
    elif defaults.get("steps_per_block"):
        S = min(B, int(defaults["steps_per_block"]))
    elif defaults.get("steps") and defaults.get("gen_length"):
        S = min(B, max(1, round(int(defaults["steps"]) * B / int(defaults["gen_length"]))))
    else:
        S = B
    if not 1 <= S <= B:
        raise APIError(400, f"steps per block must be between 1 and block_length ({B}), got {S}; more steps than "
                       f"slots commit nothing", param="steps_per_block" if req.steps is None else "steps")
    shift = defaults.get("shift")
    sampling = temperature > 0  # the filters change nothing for greedy decoding: keep such rows in one batch
    top_k = req.top_k if sampling and req.top_k and req.top_k > 0 else None
    top_p = req.top_p if sampling and req.top_p is not None and req.top_p < 1.0 else None
    settings = DecodeSettings(gen_length=gen_length, steps_per_block=S, block_length=B, threshold=threshold,
                              remasking=remasking, temperature=float(temperature),
                              shift=None if shift is None else bool(shift), top_k=top_k, top_p=top_p)
    return settings, max_tokens


FLAGS = {"max_tokens": "--max-tokens", "block_length": "--block-length", "steps_per_block": "--steps-per-block",
         "threshold": "--threshold", "remasking": "--remasking", "temperature": "--temperature"}


def check_defaults(defaults: dict[str, Any], overrides: dict[str, Any], context: int, native_block: int) -> None:
    """Refuse decoding defaults no request could use, at start-up, naming the flag (or generation_config.json
    key) to change. `overrides`: the values that came from the command line."""
    from diffcoder.errors import ConfigError

    def name(key: str) -> str:
        return FLAGS[key] if overrides.get(key) is not None else f"{key} (generation_config.json)"

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{name(key)} = {defaults[key]!r}: {why}")

    B = defaults.get("block_length") or native_block
    if "block_length" in defaults and not (isinstance(B, int) and 1 <= B < context):
        refuse("block_length", f"must be an integer from 1 to {context - 1} (the model's context)")
    S = defaults.get("steps_per_block")
    if S is not None and not (isinstance(S, int) and 1 <= S <= B):
        refuse("steps_per_block", f"must be an integer from 1 to the block length ({B}); more steps than slots "
                                  f"commit nothing")
    m = defaults.get("max_tokens")
    if m is not None and not (isinstance(m, int) and 1 <= m <= context - 1):
        refuse("max_tokens", f"must be an integer from 1 to {context - 1} (the model's context less one prompt token)")
    t = defaults.get("threshold")
    if t is not None and not (isinstance(t, int | float) and 0 < t <= 1):
        refuse("threshold", "must be in (0, 1]: the confidence a slot needs to be committed early")
    temp = defaults.get("temperature")
    if temp is not None and not (isinstance(temp, int | float) and 0 <= temp <= 2):
        refuse("temperature", "must be from 0 (greedy) to 2")
    if defaults.get("remasking", "low_confidence") not in ("low_confidence", "random"):
        refuse("remasking", "must be 'low_confidence' or 'random'")
