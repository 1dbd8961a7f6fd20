"""Reading a request, cheapest checks first: the body (size-limited), the JSON (no NaN, bounded nesting), the
sizes of the list fields, the typed request, then the text it carries (valid Unicode). Every refusal is an
`APIError` that names the field; no step's cost grows faster than the (bounded) body."""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from diffcoder.serving.schemas import (
    MAX_STOP_STRINGS,
    APIError,
    ChatRequest,
    CompletionRequest,
    refuse_not_implemented,
)

MAX_MESSAGES = 4096  # messages per chat request, and text parts per message
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHORT = reprlib.Repr()  # error messages quote a client's value in at most ~60 characters
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes. The rest of an oversized body is read and
    dropped (up to 4x the limit), so that a client still sending it gets to read the answer."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if over and size > 4 * limit:
            break
        if not over:
            chunks.append(chunk)
    if over:
        raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes; send a "
                            f"shorter prompt (or start the server with a larger --max-body-mb)",
                       code="request_too_large")
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, "the request body nests JSON arrays or objects too deeply; a request needs no more "
                            "than a few levels", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object with "
                            f"Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_sizes(body: dict[str, Any], chat: bool, max_rows: int, context: int) -> None:
    """Refuse oversized list fields by their length alone, before anything walks them."""
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if chat:
        messages = body.get("messages")
        if isinstance(messages, list):
            if len(messages) > MAX_MESSAGES:
                raise APIError(400, f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}",
                               param="messages")
            for i, m in enumerate(messages):
                if isinstance(m, dict) and isinstance(m.get("content"), list) and len(m["content"]) > MAX_MESSAGES:
                    raise APIError(400, f"messages[{i}].content has more than {MAX_MESSAGES} parts",
                                   param=f"messages[{i}].content")
        return
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return
    if all(isinstance(t, int) for t in prompt[:1]) and len(prompt) > context:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the model's context of {context}",
                       param="prompt", code="context_length_exceeded")
    if not isinstance(prompt[0], int) and len(prompt) > max_rows:
        raise APIError(400, f"prompt lists {len(prompt)} prompts but the queue holds {max_rows} rows; send "
                            f"fewer prompts per request", param="prompt")
    for i, p in enumerate(prompt):
        if isinstance(p, list) and len(p) > context:
            raise APIError(400, f"prompt[{i}] has {len(p)} tokens, more than the model's context of {context}",
                           param="prompt", code="context_length_exceeded")


def _refuse_chat_suffix(body: dict[str, Any]) -> None:
    if body.get("suffix") not in (None, ""):
        raise APIError(400, "suffix (fill-in-the-middle) works on /v1/completions only: send the code before the gap "
                            "as prompt and the code after it as suffix there", param="suffix",
                       code="unsupported_parameter")


def _validate(cls: type[CompletionRequest] | type[ChatRequest], body: dict[str, Any]):
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        parts = []
        for e in errs[:3]:  # a long list can fail on every item: name the first few
            loc = ".".join(str(x) for x in e["loc"])
            parts.append(f"{loc}: {e['msg']}" + (f" (got {_SHORT.repr(e['input'])})" if e["type"] != "missing" else ""))
        more = f"; and {len(errs) - 3} more" if len(errs) > 3 else ""
        first = errs[0]["loc"]
        raise APIError(400, "invalid request: " + "; ".join(parts) + more,
                       param=str(first[0]) if first else None, code="invalid_value") from None


def _texts(req: CompletionRequest | ChatRequest) -> list[tuple[str, str]]:
    """(param path, text) for every string the server will read, echo or tokenize."""
    out = [("model", req.model)] + ([("user", req.user)] if req.user else [])
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    out += [(f"stop[{i}]", s) for i, s in enumerate(stops)]
    if isinstance(req, ChatRequest):
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                out += [(f"messages[{i}].content[{j}].text", p.text) for j, p in enumerate(m.content)]
            elif m.content:
                out.append((f"messages[{i}].content", m.content))
    else:
        if isinstance(req.prompt, str):
            out.append(("prompt", req.prompt))
        else:
            out += [(f"prompt[{i}]", p) for i, p in enumerate(req.prompt) if isinstance(p, str)]
        if req.suffix:
            out.append(("suffix", req.suffix))
    return out


def _check_unicode(req: CompletionRequest | ChatRequest) -> None:
    for param, text in _texts(req):
        if m := _SURROGATE.search(text):
            raise APIError(400, f"{param} holds a lone surrogate ({m.group()!a}) at character {m.start()}, which "
                                f"is not valid Unicode text; send well-formed UTF-8 (pair the surrogates)",
                           param=param, code="invalid_value")


def parse_request(raw: bytes, chat: bool, max_rows: int, context: int) -> CompletionRequest | ChatRequest:
    """The typed request from a raw body, or an APIError naming the first problem."""
    body = load_json(raw)
    refuse_not_implemented(body)
    if chat:
        _refuse_chat_suffix(body)
    _check_sizes(body, chat, max_rows, context)
    req = _validate(ChatRequest if chat else CompletionRequest, body)
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    _check_unicode(req)
    return req
