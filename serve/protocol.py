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
    prompts: tuple[str | tuple[int, ...], ...] = ()  # /v1/completions: texts or token ids, one choice each
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the times a token has been generated
    repetition_penalty: float = 1.0  # CTRL's (and transformers'): logits of prompt and generated tokens
    logprobs: int | None = None  # alternatives per token to report (0: the chosen token's only); None: off
    echo: bool = False  # /v1/completions: the answer starts with the prompt (and its logprobs, if asked)
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


def _prompts(body: dict) -> tuple[str | tuple[int, ...], ...]:
    """`prompt` in the forms the OpenAI API allows: a string, a list of strings, a list of token ids, or a
    list of token-id lists (what lm-evaluation-harness sends); one choice per prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompt = [prompt]
    ok = isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or (isinstance(p, list) and p and _is_ids(p))
                                                     for p in prompt)
    if not ok:
        raise APIError(400, "prompt must be a non-empty string, a list of them, a list of token ids or a list of "
                            "token-id lists", "invalid_value")
    return tuple(p if isinstance(p, str) else tuple(p) for p in prompt)


def _is_ids(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Completions: `logprobs` N (0-20) alternatives per token. Chat: `logprobs` true, `top_logprobs` N (0-20)."""
    if chat:
        on = body.get("logprobs")
        if on is not None and not isinstance(on, bool):
            raise APIError(400, "logprobs must be a boolean for chat completions", "invalid_value")
        top = _int(body, "top_logprobs", None)
        if top is not None and not on:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value")
        value = (top or 0) if on else None
    else:
        value = None if body.get("logprobs") is False else _int(body, "logprobs", None)
        if body.get("top_logprobs") not in (None, 0):
            raise APIError(400, "top_logprobs is a chat parameter: /v1/completions takes logprobs N", "invalid_value")
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"at most {MAX_TOP_LOGPROBS} top logprobs, got {value}", "invalid_value")
    return value


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
UNSUPPORTED = {"logit_bias": (None, {}), "suffix": (None, "")}
MAX_TOP_LOGPROBS = 20


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
    echo = body.get("echo", False)
    if echo not in (None, False) and (chat or not isinstance(echo, bool)):
        raise APIError(400, "echo must be a boolean, and only /v1/completions has it", "invalid_value")
    echo = bool(echo)
    default = limits.default_chat_max_tokens if chat else limits.default_max_tokens
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, key, min(default, limits.max_tokens))
    if max_tokens is None or max_tokens < (0 if echo else 1):  # 0 with echo: score the prompt only
        raise APIError(400, f"{key} must be at least 1 (0 only with echo)", "invalid_value")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{key}={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens_too_large")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be a boolean and stream_options an object", "invalid_value")
    prompts = () if chat else _prompts(body)
    logprobs = _logprobs(body, chat)
    if stream and (len(prompts) > 1 or echo):
        raise APIError(400, "a streamed request takes one prompt, without echo (ask without stream for those)",
                       "unsupported_parameter")
    return CompletionRequest(
        model=model,
        chat=chat,
        prompts=prompts,
        messages=_messages(body) if chat else None,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stops(body, limits),
        seed=_int(body, "seed", None),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        logprobs=logprobs,
        echo=echo,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


# ---------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(req: CompletionRequest, text: str | None, finish: str | None, stream: bool, index: int = 0,
            logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if not req.chat:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if not stream:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}
    delta = {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
    return {**delta, "logprobs": logprobs} if logprobs is not None else delta


def _envelope(req: CompletionRequest, stream: bool) -> dict[str, Any]:
    kind = ("chat.completion" if req.chat else "text_completion") + (".chunk" if stream and req.chat else "")
    prefix = "chatcmpl-" if req.chat else "cmpl-"
    return {"id": prefix + req.id, "object": kind, "created": req.created, "model": req.model}


@dataclass
class Answer:
    """One choice of a non-streamed answer."""

    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None  # already in the endpoint's shape (completion_logprobs / chat_logprobs)


def completion(req: CompletionRequest, answers: list[Answer], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    choices = [_choice(req, a.text, a.finish_reason, False, i, a.logprobs) for i, a in enumerate(answers)]
    return {**_envelope(req, False), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_logprobs(entries: list[tuple[str, float | None, dict[str, float] | None]], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' logprobs object from (token text, logprob, {alternative text: logprob}) per token;
    text_offset counts characters from the start of the returned text."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [top for _, _, top in entries], "text_offset": offsets}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """/v1/chat/completions' logprobs object: per token its text, logprob, UTF-8 bytes and top alternatives."""
    def item(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top]} for t, lp, top in entries]}


def chunk(req: CompletionRequest, text: str | None, finish: str | None = None,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk; `logprobs` (the endpoint's shape) covers the tokens of this chunk's text."""
    return {**_envelope(req, True), "choices": [_choice(req, text, finish, True, logprobs=logprobs)]}


def first_chat_chunk(req: CompletionRequest) -> dict[str, Any]:
    """OpenAI's chat stream opens with the role."""
    return {**_envelope(req, True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}


def usage_chunk(req: CompletionRequest, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {**_envelope(req, True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
