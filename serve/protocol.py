"""Request parsing and validation, errors and response shapes, as OpenAI's API has them.

Everything a client sends is checked here, before it reaches the engine: a bad request gets a 4xx
with {"error": {"message", "type", "code"}} and never an exception inside the scheduler.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """An error answered to the client as JSON with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for; flags of `python -m serve`."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # upper bound on a request's max_tokens
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    default_chat_max_tokens: int = 256
    max_stops: int = 4  # as OpenAI


@dataclass
class CompletionRequest:
    """A validated /v1/completions or /v1/chat/completions body."""

    model: str
    chat: bool
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carrying usage
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, "body must be a JSON object", "invalid_json")
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; true/false is never a meaningful temperature
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{key} must be a number", "invalid_value")
    if value < lo or value > hi or (lo_open and value == lo):
        raise APIError(400, f"{key}={value} is out of range ({'(' if lo_open else '['}{lo}, {hi}])", "invalid_value")
    return float(value)


def _int(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise APIError(400, f"{key} must be an integer", "invalid_value")
    return value


def _stops(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", "invalid_value")
    if len(stops) > limits.max_stops:
        raise APIError(400, f"at most {limits.max_stops} stop strings", "invalid_value")
    return tuple(stops)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # OpenAI accepts a batch; one prompt per request here
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string", "invalid_value")
    return prompt


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "invalid_value")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message needs a string role and a string content", "invalid_value")
        out.append({"role": m["role"], "content": _content(m.get("content"))})
    return out


def _content(content: Any) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (what current SDKs
    and chat UIs send), joined; any other part type is refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise APIError(400, "each message needs a string role and a string content", "invalid_value")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"content parts must be {{\"type\": \"text\", \"text\": ...}}; this server "
                                f"reads text only, got type {kind!r}", "unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


# Fields this server does not implement, with the value that means "off": any other value is refused by
# name (400) rather than ignored, so a client never believes it got what it asked for.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "suffix": (None, "")}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if not any(value == o and type(value) is type(o) for o in off):
            raise APIError(400, f"{key}={value!r} is not supported by this server (leave it out)", "unsupported_parameter")


def parse_completion(body: dict[str, Any], chat: bool, limits: Limits) -> CompletionRequest:
    """Validate a completion body; APIError (400) on anything out of shape or over a limit."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model must be a non-empty string", "invalid_value")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise APIError(400, "only n=1 is supported", "invalid_value")
    _refuse_unsupported(body)
    default = limits.default_chat_max_tokens if chat else limits.default_max_tokens
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, key, min(default, limits.max_tokens))
    if max_tokens is None or max_tokens < 1:
        raise APIError(400, f"{key} must be at least 1", "invalid_value")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{key}={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens_too_large")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be a boolean and stream_options an object", "invalid_value")
    return CompletionRequest(
        model=model,
        chat=chat,
        prompt=None if chat else _prompt(body),
        messages=_messages(body) if chat else None,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stops(body, limits),
        seed=_int(body, "seed", None),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


# ---------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(req: CompletionRequest, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
    if not req.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}


def _envelope(req: CompletionRequest, stream: bool) -> dict[str, Any]:
    kind = ("chat.completion" if req.chat else "text_completion") + (".chunk" if stream and req.chat else "")
    prefix = "chatcmpl-" if req.chat else "cmpl-"
    return {"id": prefix + req.id, "object": kind, "created": req.created, "model": req.model}


def completion(req: CompletionRequest, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {**_envelope(req, False), "choices": [_choice(req, text, finish, False)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: CompletionRequest, text: str | None, finish: str | None = None) -> dict[str, Any]:
    return {**_envelope(req, True), "choices": [_choice(req, text, finish, True)]}


def first_chat_chunk(req: CompletionRequest) -> dict[str, Any]:
    """OpenAI's chat stream opens with the role."""
    return {**_envelope(req, True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}


def usage_chunk(req: CompletionRequest, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {**_envelope(req, True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
