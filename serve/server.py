"""The HTTP layer: the standard library's ThreadingHTTPServer, one thread per connection.

Handler threads only parse, validate, tokenize and wait on their request's events; all model work
happens on the engine's scheduler thread, which is what lets concurrent requests share a batch.
Every error is answered as OpenAI-style JSON; an unexpected exception becomes a 500 for that request
and nothing else.
"""
from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from models.generate import SamplingConfig
from serve import protocol
from serve.adapters import AdapterRegistry
from serve.engine import Engine, Job, ShuttingDown
from serve.metrics import Metrics, TimedEvents
from serve.penalties import Penalties
from serve.protocol import APIError, CompletionRequest, Limits
from serve.stops import REPLACEMENT

log = logging.getLogger("serve")
ADMIN = "/admin/adapters"


@dataclass
class App:
    """What the handlers share."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    limits: Limits
    request_timeout_s: float = 600.0  # a handler never waits forever on a wedged engine
    api_key: str | None = None  # when set, every endpoint but /health wants "Authorization: Bearer <key>"
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = field(default=0, init=False)  # requests being handled now (a shutdown waits for their answers)
    _in_flight_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        engine, reg, m = self.engine, self.registry, self.metrics
        m.gauges["queue_length"] = ("Requests waiting to be admitted into the running batch.", lambda: engine.queue_length)
        m.gauges["running_requests"] = ("Requests decoding in the running batch now.", lambda: engine.running_rows)
        m.gauges["adapters_loaded"] = ("Adapters held in memory.", lambda: len(reg.names))
        m.counters["adapter_loads_total"] = ("Adapters loaded on demand.", lambda: reg.loads)
        m.counters["adapter_evictions_total"] = ("On-demand adapters evicted to make room (least recently used).",
                                                 lambda: reg.evictions)

    def handling(self, delta: int) -> None:
        with self._in_flight_lock:
            self.in_flight += delta


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit-serve"
    # HTTP/1.1: a client keeps its connection for many requests (every answer has a Content-Length,
    # streams use chunked transfer encoding). A request whose body was not read closes the connection,
    # since the unread bytes would otherwise be taken for the next request.
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a socket read/write may stall: an idle or trickling client frees its thread
    app: App  # set on the subclass make_server builds

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def send_response(self, code: int, message: str | None = None) -> None:
        # Counted before the answer goes out, so a client that has its answer finds it counted.
        self.app.metrics.request(getattr(self, "_endpoint", "other"), code)
        super().send_response(code, message)

    def log_message(self, fmt: str, *args) -> None:  # requests go to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._body_read = False
        self._endpoint = _endpoint(path)  # the label of /metrics' requests counter
        self.app.handling(+1)
        try:
            self._authorize(path)
            self._route(method, path)
        except APIError as err:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to answer
        except Exception as err:
            log.exception("%s %s failed", method, path)
            self._send_json(500, APIError(500, f"internal error: {type(err).__name__}", "internal_error", "server_error").body())
        finally:
            self.app.handling(-1)

    def _authorize(self, path: str) -> None:
        """401 unless the request carries the server's API key (health checks need none: load balancers
        and orchestrators probe it without credentials)."""
        key = self.app.api_key
        if key is None or path == "/health":
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key")

    def _route(self, method: str, path: str) -> None:
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/v1/completions"): lambda: self._complete(chat=False),
            ("POST", "/v1/chat/completions"): lambda: self._complete(chat=True),
            ("POST", ADMIN): self._load_adapter,
        }
        if (method, path) in routes:
            return routes[(method, path)]()
        if method == "DELETE" and path.startswith(ADMIN + "/"):
            return self._unload_adapter(path[len(ADMIN) + 1 :])
        known = {p for _, p in routes} | ({path} if path.startswith(ADMIN + "/") else set())
        if path in known:
            raise APIError(405, f"{method} is not allowed on {path}", "method_not_allowed")
        raise APIError(404, f"no route {method} {path}", "not_found")

    # ------------------------------------------------------------------ endpoints

    def _health(self) -> None:
        ok = self.app.engine.alive
        self._send_json(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})

    def _metrics(self) -> None:
        data = self.app.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _models(self) -> None:
        reg = self.app.registry
        created = int(time.time())
        data = [{"id": reg.base_name, "object": "model", "created": created, "owned_by": "ftkit", "root": reg.base_name,
                 "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "ftkit", "root": str(d),
                  "parent": reg.base_name} for n, d in reg.items()]
        self._send_json(200, {"object": "list", "data": data})

    def _complete(self, chat: bool) -> None:
        app = self.app
        req = protocol.parse_completion(self._read_json(), chat, app.limits)
        prompts = self._prompt_ids(req)
        adapter = app.registry.acquire(req.model)  # pinned (never evicted) until this request is over
        try:
            self._run(req, prompts, adapter)
        finally:
            app.registry.release(adapter)

    def _run(self, req: CompletionRequest, prompts: list[list[int]], adapter: str | None) -> None:
        app = self.app
        sampling = SamplingConfig(req.max_tokens, req.temperature, req.top_p, seed=req.seed)
        penalties = Penalties(req.presence_penalty, req.frequency_penalty, req.repetition_penalty)
        jobs = [Job(ids, adapter, sampling, req.stop, penalties, req.logprobs, req.echo, events=TimedEvents())
                for ids in prompts]
        try:
            for job in jobs:
                app.engine.submit(job)
        except ShuttingDown as err:  # draining for shutdown: admits nothing new
            for job in jobs:
                job.cancelled.set()
            raise APIError(503, f"{err}: retry on another server", "server_shutting_down", "server_error") from None
        if req.stream:
            self._stream(req, jobs[0], len(prompts[0]))
            return
        answers, generated = [], 0
        try:
            for i, (job, ids) in enumerate(zip(jobs, prompts)):
                try:
                    text, last = job.result(timeout=app.request_timeout_s)
                except queue.Empty:
                    raise _timeout() from None
                self._raise_if_failed(last)
                answers.append(self._answer(req, ids, text, last, i))
                generated += last.completion_tokens
                app.metrics.latency(job.events, last.completion_tokens)
        except APIError:
            for job in jobs:
                job.cancelled.set()
            raise
        app.metrics.tokens(sum(map(len, prompts)), generated)
        self._send_json(200, protocol.completion(req, answers, sum(map(len, prompts)), generated))

    def _answer(self, req: CompletionRequest, prompt_ids: list[int], text: str, last, index: int) -> protocol.Answer:
        """One choice: the text (after the prompt, with echo) and its logprobs in the endpoint's shape."""
        tok, piece = self.app.tokenizer, self._piece
        source = req.prompts[index] if req.prompts else None
        head = (source if isinstance(source, str) else tok.decode(prompt_ids, skip_special_tokens=False)) if req.echo else ""
        if req.logprobs is None:
            return protocol.Answer(head + text, last.finish_reason)
        generated = _within(last.logprobs or [], len(text), tok.decode, tok.stop_ids)  # a stop string may cut the text
        if req.chat:
            return protocol.Answer(text, last.finish_reason, protocol.chat_logprobs(_chat_entries(generated, piece)))
        scored = (last.prompt_logprobs or []) + generated
        return protocol.Answer(head + text, last.finish_reason,
                               protocol.completion_logprobs(_completion_entries(scored, piece)))

    def _piece(self, token: int) -> str:
        return self.app.tokenizer.decode([token], skip_special_tokens=False)

    def _prompt_ids(self, req: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt: the chat rendered through the template, texts encoded, ids as given."""
        tok, limit = self.app.tokenizer, self.app.limits.max_prompt_tokens
        vocab = self.app.engine.model.config.vocab_size
        sources = [tok.render_chat(req.messages, add_generation_prompt=True)] if req.chat else list(req.prompts)
        out = []
        for source in sources:
            ids = tok.encode(source) if isinstance(source, str) else list(source)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens", "invalid_value")
            if max(ids) >= vocab:
                raise APIError(400, f"token id {max(ids)} is out of the vocabulary (size {vocab})", "invalid_value")
            if len(ids) > limit:
                raise APIError(400, f"prompt has {len(ids)} tokens, over this server's limit of {limit}",
                               "context_length_exceeded")
            out.append(ids)
        return out

    def _stream(self, req: CompletionRequest, job: Job, prompt_tokens: int) -> None:
        """Server-sent events: a chunk per text delta, a last chunk with finish_reason, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        logprobs = _StreamedLogprobs(req, self._piece, self.app.tokenizer) if req.logprobs is not None else None
        try:
            if req.chat:
                self._write(protocol.sse(protocol.first_chat_chunk(req)))
            for event in job.stream(timeout=self.app.request_timeout_s):
                if event.kind == "text":
                    lp = logprobs.take(event) if logprobs is not None else None
                    self._write(protocol.sse(protocol.chunk(req, event.text, logprobs=lp)))
                elif event.kind == "done":
                    self._write(protocol.sse(protocol.chunk(req, None if req.chat else "", event.finish_reason)))
                    if req.include_usage:
                        self._write(protocol.sse(protocol.usage_chunk(req, prompt_tokens, event.completion_tokens)))
                    self.app.metrics.tokens(prompt_tokens, event.completion_tokens)
                    self.app.metrics.latency(job.events, event.completion_tokens)
                else:  # the headers are out: the error goes in the stream, as OpenAI does
                    self._write(protocol.sse(_stream_error(event.error).body()))
            self._write(protocol.sse("[DONE]"))
            self._end_chunks()
        except queue.Empty:
            job.cancelled.set()
            self._write(protocol.sse(_timeout().body()))
            self._end_chunks()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # stop generating for a client that left
            self.close_connection = True
        except Exception as err:  # the 200 and part of the body are out: end the stream with an error event
            log.exception("stream failed")
            job.cancelled.set()
            self.close_connection = True
            failed = APIError(500, f"internal error: {type(err).__name__}", "internal_error", "server_error")
            self._write(protocol.sse(failed.body()))
            self._end_chunks()

    def _load_adapter(self) -> None:
        body = self._read_json()
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise APIError(400, 'need {"name": str, "path": str}', "invalid_value")
        reg = self.app.registry
        reg.load(name, reg.path_under_root(path))
        self._send_json(200, {"id": name, "object": "model", "parent": reg.base_name})

    def _unload_adapter(self, name: str) -> None:
        reg = self.app.registry
        reg.path_under_root(".")  # admin is off without a root, for unloading too
        reg.unload(name)
        self._send_json(200, {"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------------ plumbing

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "Content-Length is required", "length_required")
        try:
            n = int(length)
        except ValueError:
            raise APIError(400, "bad Content-Length", "invalid_request") from None
        if n < 0 or n > self.app.limits.max_body_bytes:
            raise APIError(413, f"body of {n} bytes is over the limit of {self.app.limits.max_body_bytes}", "body_too_large")
        data = self.rfile.read(n)
        self._body_read = True
        return protocol.parse_json(data)

    @staticmethod
    def _raise_if_failed(last) -> None:
        if last.kind == "error":
            raise _stream_error(last.error)

    def _unread_body(self) -> bool:
        """True when the request sent a body this handler did not read (an error answered before it)."""
        if self._body_read:
            return False
        return "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0").strip() not in ("", "0")

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self._unread_body():  # its bytes would be read as the next request: close instead
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _write(self, data: bytes) -> None:
        """One chunk of a chunked (streamed) answer."""
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _StreamedLogprobs:
    """The logprobs of a streamed answer, chunk by chunk: each text event carries the entries of the tokens
    fed since the one before (more than its text when text was held back for a stop string); a chunk gets
    those whose token texts fall within the text sent so far, so the chunks together hold what the
    non-streamed answer holds (`_within` of the whole text)."""

    def __init__(self, req: CompletionRequest, piece, tokenizer) -> None:
        self.req, self.piece, self.tokenizer = req, piece, tokenizer
        self.pending: list = []  # entries carried by events but not sent yet
        self.sent: list[int] = []  # tokens of the entries sent
        self.sent_chars = 0  # characters of the sent entries' token texts
        self.text_chars = 0  # characters of the text sent so far

    def take(self, event) -> dict | None:
        self.pending += event.logprobs or []
        self.text_chars += len(event.text)
        tok = self.tokenizer
        fresh = _within(self.pending, self.text_chars, tok.decode, tok.stop_ids, before=self.sent)
        del self.pending[: len(fresh)]
        self.sent += [t for t, _, _ in fresh]
        offset = self.sent_chars
        self.sent_chars += sum(len(self.piece(t)) for t, _, _ in fresh)
        if self.req.chat:
            return protocol.chat_logprobs(_chat_entries(fresh, self.piece))
        return protocol.completion_logprobs(_completion_entries(fresh, self.piece), offset)


def _chat_entries(entries: list, piece) -> list:
    return [(piece(t), lp, [(piece(a), v) for a, v in top]) for t, lp, top in entries]


def _completion_entries(entries: list, piece) -> list:
    return [(piece(t), lp, None if lp is None else _by_text(top, piece)) for t, lp, top in entries]


def _endpoint(path: str) -> str:
    """The endpoint label of /metrics: a known route's path, never a client's arbitrary one."""
    if path.startswith(ADMIN + "/"):
        return ADMIN
    known = {"/health", "/v1/models", "/metrics", "/v1/completions", "/v1/chat/completions", ADMIN}
    return path if path in known else "other"


def _by_text(top: list[tuple[int, float]], piece) -> dict[str, float]:
    """Alternatives keyed by their text, as OpenAI's completions have them; two tokens that decode alike
    share a key, which keeps the likelier one (`top` is sorted most likely first)."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(piece(token), logprob)
    return out


def _within(entries: list, chars: int, decode, stop_ids, before: list[int] | None = None) -> list:
    """The leading entries whose tokens, decoded after the tokens `before`, make up `chars` characters of
    whole text (the last may run past it, cut by a stop string), and a stop token right after them (the
    model's last token: in the logprobs, as lm-evaluation-harness counts on, though not in the text).
    Decoded as a whole prefix, not token by token: several tokens can make up one character."""
    ids = list(before or [])
    n = 0
    while n < len(entries):
        text = decode(ids)
        if len(text) >= chars and not text.endswith(REPLACEMENT):
            break
        ids.append(entries[n][0])
        n += 1
    if n < len(entries) and entries[n][0] in stop_ids:
        n += 1
    return entries[:n]


def _timeout() -> APIError:
    return APIError(504, "generation timed out", "timeout", "server_error")


def _stream_error(err: BaseException | None) -> APIError:
    if isinstance(err, KeyError):  # the adapter was unloaded while the request waited
        return APIError(404, str(err), "model_not_found")
    if isinstance(err, ShuttingDown):  # cut by a drain's bound or a stop (engine.drain, engine.stop)
        return APIError(503, "the server is shutting down: the request was cut before it finished",
                        "server_shutting_down", "server_error")
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", "internal_error", "server_error")


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free one, see server.server_address); not yet serving."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    return Server((host, port), handler)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never keeps the process alive
    # The listen backlog: socketserver's default of 5 resets connections when a burst of clients
    # connects at once, which is exactly the load batching is for.
    request_queue_size = 256
