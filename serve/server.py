"""The HTTP layer: the standard library's ThreadingHTTPServer, one thread per connection.

Handler threads only parse, validate, tokenize and wait on their request's events; all model work
happens on the engine's scheduler thread, which is what lets concurrent requests share a batch.
Every error is answered as OpenAI-style JSON; an unexpected exception becomes a 500 for that request
and nothing else.
"""
from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from models.generate import SamplingConfig
from serve import protocol
from serve.adapters import AdapterRegistry
from serve.engine import Engine, Job
from serve.protocol import APIError, CompletionRequest, Limits

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


class Handler(BaseHTTPRequestHandler):
    server_version = "ftkit-serve"
    # HTTP/1.0: one request per connection, so a server-sent event stream simply ends with the
    # connection, without chunked encoding.
    protocol_version = "HTTP/1.0"
    timeout = 60  # seconds a socket read/write may stall: an idle or trickling client frees its thread
    app: App  # set on the subclass make_server builds

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, fmt: str, *args) -> None:  # requests go to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._route(method, path)
        except APIError as err:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to answer
        except Exception as err:
            log.exception("%s %s failed", method, path)
            self._send_json(500, APIError(500, f"internal error: {type(err).__name__}", "internal_error", "server_error").body())

    def _route(self, method: str, path: str) -> None:
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
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
        adapter = app.registry.resolve(req.model)
        prompt_ids = self._prompt_ids(req)
        sampling = SamplingConfig(req.max_tokens, req.temperature, req.top_p, seed=req.seed)
        job = app.engine.submit(Job(prompt_ids, adapter, sampling, req.stop))
        if req.stream:
            self._stream(req, job, len(prompt_ids))
            return
        try:
            text, last = job.result(timeout=app.request_timeout_s)
        except queue.Empty:
            job.cancelled.set()
            raise _timeout() from None
        self._raise_if_failed(last)
        self._send_json(200, protocol.completion(req, text, last.finish_reason, len(prompt_ids), last.completion_tokens))

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        tok = self.app.tokenizer
        text = tok.render_chat(req.messages, add_generation_prompt=True) if req.chat else req.prompt
        ids = tok.encode(text)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", "invalid_value")
        if len(ids) > self.app.limits.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(ids)} tokens, over this server's limit of "
                                f"{self.app.limits.max_prompt_tokens}", "context_length_exceeded")
        return ids

    def _stream(self, req: CompletionRequest, job: Job, prompt_tokens: int) -> None:
        """Server-sent events: a chunk per text delta, a last chunk with finish_reason, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if req.chat:
                self._write(protocol.sse(protocol.first_chat_chunk(req)))
            for event in job.stream(timeout=self.app.request_timeout_s):
                if event.kind == "text":
                    self._write(protocol.sse(protocol.chunk(req, event.text)))
                elif event.kind == "done":
                    self._write(protocol.sse(protocol.chunk(req, None if req.chat else "", event.finish_reason)))
                    if req.include_usage:
                        self._write(protocol.sse(protocol.usage_chunk(req, prompt_tokens, event.completion_tokens)))
                else:  # the headers are out: the error goes in the stream, as OpenAI does
                    self._write(protocol.sse(_stream_error(event.error).body()))
            self._write(protocol.sse("[DONE]"))
        except queue.Empty:
            job.cancelled.set()
            self._write(protocol.sse(_timeout().body()))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # stop generating for a client that left

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
            self.close_connection = True  # the unread body must not be taken for a next request
            raise APIError(413, f"body of {n} bytes is over the limit of {self.app.limits.max_body_bytes}", "body_too_large")
        return protocol.parse_json(self.rfile.read(n))

    @staticmethod
    def _raise_if_failed(last) -> None:
        if last.kind == "error":
            raise _stream_error(last.error)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def _timeout() -> APIError:
    return APIError(504, "generation timed out", "timeout", "server_error")


def _stream_error(err: BaseException | None) -> APIError:
    if isinstance(err, KeyError):  # the adapter was unloaded while the request waited
        return APIError(404, str(err), "model_not_found")
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
