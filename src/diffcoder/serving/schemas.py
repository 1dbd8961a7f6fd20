"""Request bodies (OpenAI shapes plus the diffusion extras) and how they become decoder settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class DiffusionFields(BaseModel):
    """Fields shared by both endpoints. Types are strict: a string where a number belongs is a 400."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # accepted for compatibility; not used
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
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
    echo: bool = False


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


def parse(model_cls: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        parts = []
        for e in errs:
            loc = ".".join(str(x) for x in e["loc"])
            parts.append(f"{loc}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
        first = errs[0]["loc"]
        raise APIError(400, "invalid request: " + "; ".join(parts),
                       param=str(first[0]) if first else None, code="invalid_value") from None


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, f"stop takes at most 4 strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
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
    settings = DecodeSettings(gen_length=gen_length, steps_per_block=S, block_length=B, threshold=threshold,
                              remasking=remasking, temperature=float(temperature),
                              shift=None if shift is None else bool(shift))
    return settings, max_tokens
