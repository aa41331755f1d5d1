"""The batching engine: one scheduler thread runs every request on the one loaded model.

The scheduler waits for a request, then collects more for a short window (up to `max_batch`) and
runs them as one left-padded batch with a KV cache, each row with its own adapter (rows of several
LoRA adapters share every base matmul; only the small low-rank deltas are computed per adapter;
a prompt/prefix-tuning adapter's requests run as a batch of their own),
sampling parameters, token limit and stop strings. Text goes back per request as it is produced.
Rows that finish early stay in the batch as masked padding until the whole batch is done (static
batching: simple, and exactly what `models.generate.generate` computes for each row).

An exception while running a batch fails the requests of that batch only; the thread goes on.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lora.inject import per_row_adapters
from models.decoder import KVCache
from models.generate import SamplingConfig, cache_dtype, left_pad, sample_next
from serve.penalties import Penalties, penalize
from serve.stops import TextStream

log = logging.getLogger("serve")


@dataclass
class EngineConfig:
    max_batch: int = 16  # rows per batch at most
    window_s: float = 0.01  # how long the scheduler waits for more requests after the first
    cross_adapter: bool = True  # False: a batch only holds requests for the same adapter


@dataclass
class Event:
    """What a request's consumer receives: text deltas, then one "done" (or one "error")."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length", on "done"
    completion_tokens: int = 0
    error: BaseException | None = None
    # on "done" when the job asked for logprobs: (token id, logprob, top alternatives) per generated token
    # (the stop token left out), and with echo the same per prompt token (the first one's logprob None)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


TokenLogprob = tuple[int, "float | None", list[tuple[int, float]]]


@dataclass(eq=False)  # identity: two requests with the same fields are still two requests
class Job:
    """One request as the engine sees it."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingConfig  # its stop_ids are ignored: every row stops at the tokenizer's stop tokens
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    penalties: Penalties = Penalties()  # presence / frequency / repetition (serve.penalties)
    logprobs: int | None = None  # report each token's logprob and this many top alternatives (None: off)
    echo: bool = False  # with logprobs: the prompt tokens' logprobs too
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until "done" or "error" (included)."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if event.kind != "text":
                return

    def result(self, timeout: float | None = None) -> tuple[str, Event]:
        """(the whole text, the final event) for a non-streamed answer."""
        parts, last = [], None
        for last in self.stream(timeout):
            parts.append(last.text)
        return "".join(parts), last


@dataclass
class EngineStats:
    batches: int = 0
    forwards: int = 0
    max_rows: int = 0  # most rows in one forward: > 1 means requests were batched
    max_adapters: int = 0  # most distinct adapters (base included) in one batch
    requests: int = 0
    failed_batches: int = 0


class _Row:
    """A job's decoding state within a batch."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], stop_ids: set[int], device) -> None:
        self.job = job
        self.text = TextStream(decode, job.stop)
        self.stop_ids = stop_ids
        self.done = False
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.generator = None
        if job.sampling.seed is not None:  # the same stream of samples as generate() with this seed alone
            self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)

    def push(self, token: int, logprobs: torch.Tensor | None = None) -> None:
        """Take the sampled token; `logprobs` [V]: the distribution it was drawn from (when asked for)."""
        if self.job.cancelled.is_set():  # the client went away
            self.done = True
            return
        if logprobs is not None and token not in self.stop_ids:
            self.logprobs.append(_token_logprob(logprobs, token, self.job.logprobs))
        if token in self.stop_ids:
            self.text.tokens.append(token)
            return self.finish("stop")
        delta = self.text.feed(token)
        if delta:
            self.job.events.put(Event("text", delta))
        if self.text.stopped:
            self.finish("stop")
        elif len(self.text.tokens) >= self.job.sampling.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        rest = self.text.flush()
        if rest:
            self.job.events.put(Event("text", rest))
        asked = self.job.logprobs is not None
        self.job.events.put(Event("done", finish_reason=reason, completion_tokens=len(self.text.tokens),
                                  logprobs=self.logprobs if asked else None, prompt_logprobs=self.prompt_logprobs))
        self.done = True


def _token_logprob(logprobs: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """(token, its logprob, the `top` most likely tokens with theirs) from one position's logprobs [V]."""
    alternatives = []
    if top:
        values, ids = logprobs.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return token, float(logprobs[token]), alternatives


def prompt_logprobs(logprobs: torch.Tensor, prompt: list[int], top: int | None) -> list[TokenLogprob]:
    """Per prompt token, its logprob given the tokens before it; logprobs [T, V] over the row's positions
    (the last T = len(prompt) of a left-padded row). The first token has no context: None."""
    first: TokenLogprob = (prompt[0], None, [])
    return [first] + [_token_logprob(logprobs[j - 1], prompt[j], top) for j in range(1, len(prompt))]


class Engine:
    """Owns the model; `submit` jobs from any thread, they run on the scheduler thread."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, has_adapter: Callable[[str], bool] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.lock = threading.Lock()  # held while a batch runs; adapter changes take it too
        self.has_adapter = has_adapter or (lambda name: True)
        # adapter name -> its prompt/prefix-tuning module, None for LoRA adapters and the base
        self.virtual_tokens: Callable[[str | None], object | None] = lambda name: None
        self.stats = EngineStats()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        while not self._queue.empty():  # nobody will run these any more
            self._fail([self._queue.get_nowait()], RuntimeError("server shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        if self._stop.is_set():
            raise RuntimeError("engine is stopped")
        self._queue.put(job)
        return job

    # ------------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            for group in self._groups(batch):
                self._run_safely(group)

    def _collect(self) -> list[Job]:
        """The first waiting job, plus whatever else arrives within the window (max_batch in all)."""
        try:
            batch = [self._queue.get(timeout=0.05)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.config.window_s
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _groups(self, batch: list[Job]) -> list[list[Job]]:
        """Sub-batches that can share a forward: all LoRA/base rows together (cross_adapter), else one
        adapter per batch; a prompt/prefix-tuning adapter always gets its own."""
        groups: dict[tuple[str, str | None], list[Job]] = {}
        for job in batch:
            if self.virtual_tokens(job.adapter) is not None:
                key = ("virtual", job.adapter)
            else:
                key = ("lora", None if self.config.cross_adapter else job.adapter)
            groups.setdefault(key, []).append(job)
        return list(groups.values())

    def _run_safely(self, jobs: list[Job]) -> None:
        try:
            self.run_batch(jobs)
        except Exception as err:  # one bad batch must not take the server down
            log.exception("batch of %d failed", len(jobs))
            self.stats.failed_batches += 1
            self._fail(jobs, err)

    @staticmethod
    def _fail(jobs: Sequence[Job], err: BaseException) -> None:
        for job in jobs:
            job.events.put(Event("error", error=err))

    # ------------------------------------------------------------------ running a batch

    def run_batch(self, jobs: list[Job]) -> None:
        """Generate for `jobs` as one batch; every job gets its "done" (or "error") event."""
        with self.lock:
            gone = [j for j in jobs if j.adapter is not None and not self.has_adapter(j.adapter)]
            self._fail(gone, KeyError("adapter unloaded while the request waited"))
            jobs = [j for j in jobs if j not in gone and not j.cancelled.is_set()]
            if jobs:
                self._generate(jobs)

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        tok = self.tokenizer
        rows = [_Row(j, tok.decode, tok.stop_ids, self.device) for j in jobs]
        ids, mask = left_pad([j.prompt_ids for j in jobs], tok.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        steps = max(j.sampling.max_new_tokens for j in jobs)
        virtual = self.virtual_tokens(jobs[0].adapter)  # _groups never mixes these with other rows
        slots = virtual.num_virtual_tokens if virtual is not None else 0
        cache = KVCache.empty(self.model.config, len(jobs), slots + ids.shape[1] + steps,
                              cache_dtype(self.model, self.device), self.device)
        self._count(jobs)
        step_ids = ids
        lora_names = [None if virtual is not None else j.adapter for j in jobs]
        with per_row_adapters(self.model, lora_names), self._virtual_attached(virtual):
            for step in range(max(steps, 1)):  # one forward at least: max_tokens 0 with echo scores the prompt
                out = self.model(step_ids, attention_mask=mask, cache=cache)
                self.stats.forwards += 1
                if step == 0:
                    self._echo(out, rows)
                logits = out[:, -1].float()
                for row in rows:
                    if not row.done and row.job.sampling.max_new_tokens == 0:
                        row.finish("length")
                logits, nxt = self._sample(logits, rows)
                alive = torch.tensor([not r.done for r in rows], device=self.device)
                for i, (row, token) in enumerate(zip(rows, nxt.tolist())):
                    if not row.done:
                        row.push(token, torch.log_softmax(logits[i], -1) if row.job.logprobs is not None else None)
                if all(r.done for r in rows):
                    break
                # Finished rows go on as padding, masked out of every later step (as generate() does).
                nxt = torch.where(alive, nxt, torch.full_like(nxt, tok.pad_id))
                mask = torch.cat([mask, alive.long()[:, None]], dim=1)
                step_ids = nxt[:, None]

    @contextlib.contextmanager
    def _virtual_attached(self, module) -> Iterator[None]:
        self.model.virtual_tokens = module
        try:
            yield
        finally:
            self.model.virtual_tokens = None

    def _count(self, jobs: list[Job]) -> None:
        s = self.stats
        s.batches += 1
        s.requests += len(jobs)
        s.max_rows = max(s.max_rows, len(jobs))
        s.max_adapters = max(s.max_adapters, len({j.adapter for j in jobs}))

    @staticmethod
    def _echo(out: torch.Tensor, rows: list[_Row]) -> None:
        """The prompt tokens' logprobs of rows that echo them, from the first forward's logits [B, T, V]."""
        for i, row in enumerate(rows):
            if row.job.echo and row.job.logprobs is not None:
                prompt = row.job.prompt_ids
                logprobs = torch.log_softmax(out[i, out.shape[1] - len(prompt):].float(), -1)
                row.prompt_logprobs = prompt_logprobs(logprobs, prompt, row.job.logprobs)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the logits the tokens are drawn from, the tokens): greedy rows in one argmax, sampled rows one by
        one, each with its own temperature, top_p, seed. A row's penalties change its logits first
        (logits: [B, V] float32, this step's own copy)."""
        for i, row in enumerate(rows):
            if not row.done and not row.job.penalties.off:
                logits[i] = penalize(logits[i], row.job.prompt_ids, row.text.tokens, row.job.penalties)
        nxt = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            s = row.job.sampling
            if not row.done and s.temperature > 0:
                nxt[i] = sample_next(logits[i : i + 1], s, row.generator)[0]
        return logits, nxt
