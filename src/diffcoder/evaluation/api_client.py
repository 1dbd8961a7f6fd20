"""Generation through an OpenAI-compatible server (`/v1/completions`): `diffcoder eval ... --api-base URL`.

The same prompts the local harness builds, as text: a task's prompt, and for fill-in-the-middle tasks its suffix in
the `suffix` field (the server lays them out with its FIM tokens: `diffcoder serve` does, as do OpenAI's and
vLLM's FIM-capable models). A batch's requests are in flight together, so a batching server decodes them
together. Standard library only (urllib), so evaluating a served model needs no extra package.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from diffcoder.errors import ConfigError

MAX_STOPS = 4  # what OpenAI's API takes; the harness cuts at every stop string itself anyway
# Request fields for decoding values beyond the standard ones: sent only when given on the command line
# (`diffcoder serve` reads them; other servers may refuse unknown fields).
EXTENSION_FIELDS = ("steps", "steps_per_block", "block_length", "threshold", "remasking", "top_k")


def check_request_decoding(values: dict) -> dict:
    """The decoding values a completions request can carry; the others are an error naming the way out."""
    if values.get("threshold") == "none":
        raise ConfigError("--threshold none cannot be sent in a request (a request without a threshold gets the "
                          "server's); start the server with the setting you want, e.g. `diffcoder serve "
                          "--steps-per-block` equal to the block length, or give a number")
    for key, flag in (("shift", "--shift"), ("eos_id", "--eos-id")):
        if key in values:
            raise ConfigError(f"{flag} is the served checkpoint's setting, not a request's: drop it with --api-base")
    return values


def api_key(flag: str | None) -> str | None:
    return flag or os.environ.get("OPENAI_API_KEY") or None


def endpoint(base: str, path: str) -> str:
    """`path` under the API root: the base may or may not end in /v1 (both spellings are common)."""
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"--api-base must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base!r}")
    return f"{base if base.endswith('/v1') else base + '/v1'}/{path}"


def _request(url: str, body: dict | None, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own URL
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = detail[:500]
        raise ConfigError(f"the server at {url} answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"cannot reach {url} ({reason}); is the server running, and is --api-base right?") from exc
    except ValueError as exc:
        raise ConfigError(f"{url} did not answer JSON: is --api-base an OpenAI-compatible server?") from exc


def resolve_api_model(base: str, model: str | None, key: str | None, timeout: float = 60.0) -> str:
    """--api-model, else the first model the server lists."""
    if model:
        return model
    listed = _request(endpoint(base, "models"), None, key, timeout).get("data") or []
    if not listed or not isinstance(listed[0], dict) or "id" not in listed[0]:
        raise ConfigError(f"{endpoint(base, 'models')} lists no model; name one with --api-model")
    return str(listed[0]["id"])


class ApiDecoder:
    """Sends a batch of (task, sample) prompts to /v1/completions and returns the harness's rows."""

    def __init__(self, cfg, key: str | None, timeout: float) -> None:
        if cfg.prompt_style == "instruct":
            raise ConfigError("--api-base sends completion prompts; use --prompt-style base (instruct runs need "
                              "the chat template of a local checkpoint)")
        self.cfg, self.key, self.timeout = cfg, key, timeout
        self.url = endpoint(cfg.api_base, "completions")

    def prompt_record(self, task) -> str:
        """The prompt as the run's records show it (the suffix after a marker line, for FIM)."""
        style = self.cfg.prompt_style
        suffix = task.fim_suffix(style)
        text = task.prompt_text(style)
        return text if suffix is None else f"{text}\n<|suffix (sent in the suffix field)|>\n{suffix}"

    def body(self, task, sample: int) -> dict:
        style, dec = self.cfg.prompt_style, self.cfg.decoding
        body = {"model": self.cfg.model, "prompt": task.prompt_text(style),
                "max_tokens": dec["max_new_tokens"], "temperature": dec.get("temperature", 0.0)}
        suffix = task.fim_suffix(style)
        if suffix is not None:
            body["suffix"] = suffix
        stops = task.stop_strings(style)[:MAX_STOPS]
        if stops:
            body["stop"] = stops
        if dec.get("temperature"):
            body["seed"] = self.cfg.seed * 1_000_003 + sample
            if dec.get("top_p") is not None:
                body["top_p"] = dec["top_p"]
        body.update({k: dec[k] for k in EXTENSION_FIELDS if dec.get(k) is not None})
        return body

    def _one(self, item) -> dict:
        task, sample = item
        answer = _request(self.url, self.body(task, sample), self.key, self.timeout)
        try:
            choice = answer["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"{self.url} answered without choices[0].text: not an OpenAI completions "
                              "server?") from exc
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        return {"text": text, "tokens": int(tokens) if tokens is not None else 0, "forwards": 0,
                "finish_reason": choice.get("finish_reason")}

    def __call__(self, batch: list) -> tuple[list[dict], int]:
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            return list(pool.map(self._one, batch)), 0
