"""The batching engine: one scheduler thread runs every request on the one loaded model.

Continuous (iteration-level) batching. Between two decode steps the scheduler admits the requests
waiting (up to `max_batch` rows in all): it prefills them together, samples their first token, and
their keys and values join the running batch's cache (serve.slots.SlotCache); then every running row
decodes one token in one forward. A row that finishes leaves at once and its slot is reused, so a
short request never waits behind a long one. Each row keeps its own adapter (rows of several LoRA
adapters share every base matmul; only the low-rank deltas are per adapter), sampling parameters,
penalties, token limit and stop strings; text goes back per request as it is produced.

Rows decode in "lanes": all LoRA and base rows share one (or one per adapter without
cross-adapter batching); each prompt/prefix-tuning adapter has its own, since the model holds one set
of virtual tokens at a time. Each scheduler iteration steps every lane once.

`continuous=False` gives static batching (for comparison): requests are admitted only when nothing
is running, after a short collection window, and the batch runs until its last row is done, finished
rows riding along as masked padding (`pad_finished`, what this server did before continuous batching).

An exception while prefilling or stepping fails the requests involved only; the thread goes on.
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

from lora.inject import lora_layers, per_row_adapters
from models.decoder import KVCache
from models.generate import SamplingConfig, cache_dtype, left_pad, sample_next
from serve.penalties import Penalties, penalize
from serve.slots import SlotCache
from serve.stops import TextStream

log = logging.getLogger("serve")


class ShuttingDown(RuntimeError):
    """Raised by `submit` while draining, and the error of requests a stop or a drain's bound cut short."""


@dataclass
class EngineConfig:
    max_batch: int = 16  # rows per batch at most
    window_s: float = 0.01  # how long the scheduler waits for more requests after the first
    cross_adapter: bool = True  # False: a batch only holds requests for the same adapter
    continuous: bool = True  # False: static batching (admit only when nothing runs)
    # static batching only: finished rows ride along as masked padding until the batch's last row is done
    # (the classic static batch, and this server's before continuous batching); False: they leave at once
    pad_finished: bool = True


@dataclass
class Event:
    """What a request's consumer receives: text deltas, then one "done" (or one "error")."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length", on "done"
    completion_tokens: int = 0
    error: BaseException | None = None
    # on "done" when the job asked for logprobs: (token id, logprob, top alternatives) per generated token
    # (a stop token the model ended with included, as the last), and with echo the same per prompt token (the first one's logprob None)
    # on "text" when the job asked for logprobs: the tokens fed since the previous text event (text may be
    # held back for a possible stop string, so they can cover more than `text`)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    at: float = field(default_factory=time.monotonic)  # when the engine produced it (time.monotonic)


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
    batches: int = 0  # prefills (groups of requests admitted together)
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
        self.unsent = 0  # entries of self.logprobs not yet carried by a text event
        self.next_token = -1  # the last sampled token: the row's input at the next decode step
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.generator = None
        if job.sampling.seed is not None:  # the same stream of samples as generate() with this seed alone
            self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)

    def push(self, token: int, logprobs: torch.Tensor | None = None) -> None:
        """Take the sampled token; `logprobs` [V]: the distribution it was drawn from (when asked for)."""
        if self.job.cancelled.is_set():  # the client went away
            self.done = True
            return
        if logprobs is not None:
            self.logprobs.append(_token_logprob(logprobs, token, self.job.logprobs))
        if token in self.stop_ids:
            self.text.tokens.append(token)
            return self.finish("stop")
        delta = self.text.feed(token)
        if delta:
            self._send(delta)
        if self.text.stopped:
            self.finish("stop")
        elif len(self.text.tokens) >= self.job.sampling.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        rest = self.text.flush()
        if rest or len(self.logprobs) > self.unsent:  # the last tokens' logprobs go out even without text
            self._send(rest)
        asked = self.job.logprobs is not None
        self.job.events.put(Event("done", finish_reason=reason, completion_tokens=len(self.text.tokens),
                                  logprobs=self.logprobs if asked else None, prompt_logprobs=self.prompt_logprobs))
        self.done = True

    def _send(self, text: str) -> None:
        fresh = None
        if self.job.logprobs is not None:
            fresh, self.unsent = self.logprobs[self.unsent:], len(self.logprobs)
        self.job.events.put(Event("text", text, logprobs=fresh))


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


class StepLock:
    """The lock the scheduler holds for each step and the adapter registry takes between steps.

    A plain Lock is not fair: the scheduler, re-acquiring it in a tight loop, could starve a thread
    waiting to load an adapter. Here the scheduler steps aside (`yield_to_waiters`) while anyone waits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0
        self.holds = 0  # times taken: a jump between two of the scheduler's steps means someone else held it

    def __enter__(self) -> StepLock:
        with self._count:
            self._waiting += 1
        self._lock.acquire()
        with self._count:
            self._waiting -= 1
        self.holds += 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def yield_to_waiters(self, scheduler_waits: float = 0.0005) -> None:
        while self._waiting:
            time.sleep(scheduler_waits)


class _Lane:
    """Rows that decode in one forward: their cache, and the virtual tokens they share (or None)."""

    def __init__(self, virtual, cache: SlotCache) -> None:
        self.virtual = virtual  # a prompt/prefix-tuning module, or None for LoRA adapters and the base
        self.cache = cache
        self.rows: list[_Row] = []


class Engine:
    """Owns the model; `submit` jobs from any thread, they run on the scheduler thread."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, has_adapter: Callable[[str], bool] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.lock = StepLock()  # held for each step; adapter changes take it between steps
        self.has_adapter = has_adapter or (lambda name: True)
        # adapter name -> its prompt/prefix-tuning module, None for LoRA adapters and the base
        self.virtual_tokens: Callable[[str | None], object | None] = lambda name: None
        self.stats = EngineStats()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lanes: dict[tuple[str, str | None], _Lane] = {}
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self.device = next(model.parameters()).device
        self._lora_layers: list | None = None  # the model's LoRA layers, found again after adapter changes
        self._holds = -1  # lock.holds after the scheduler's last step

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop now: running and waiting requests end with an error event."""
        self._draining.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail(self._waiting(), ShuttingDown("server shutting down"))

    def drain(self, timeout_s: float) -> None:
        """Admit nothing new; let waiting and running requests finish for up to `timeout_s`, then stop."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while (self.queue_length or self.running_rows) and self.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        """Requests waiting to be admitted."""
        return self._queue.qsize()

    @property
    def running_rows(self) -> int:
        """Requests decoding now."""
        return sum(len(lane.rows) for lane in list(self._lanes.values()))

    def submit(self, job: Job) -> Job:
        if self._draining.is_set():
            raise ShuttingDown("server shutting down")
        self._queue.put(job)
        return job

    # ------------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._take()
            with self.lock:
                if self.lock.holds != self._holds + 1:  # adapters may have changed in between
                    self._lora_layers = [layer for _, layer in lora_layers(self.model)]
                self._holds = self.lock.holds
                self._drop_orphans()
                for key, group in self._groups(jobs).items():
                    self._safely(self._prefill, key, group)
                for key, lane in list(self._lanes.items()):
                    self._safely(self._step, key, lane)
                for key in [k for k, lane in self._lanes.items() if not lane.rows]:
                    del self._lanes[key]  # frees its cache
            self.lock.yield_to_waiters()
        err = ShuttingDown("server shutting down")
        for lane in self._lanes.values():
            self._fail([row.job for row in lane.rows], err)
        self._lanes.clear()

    def _take(self) -> list[Job]:
        """The requests to admit now: continuous batching takes whatever waits, up to the free rows;
        static batching only when nothing runs, after a collection window. Blocks briefly when idle."""
        running = self.running_rows
        free = self.config.max_batch - running
        if free <= 0 or (running and not self.config.continuous):
            return []
        jobs = []
        if not running:
            try:
                jobs.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return []
        deadline = time.monotonic() + (0 if self.config.continuous else self.config.window_s)
        while len(jobs) < free:
            remaining = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _groups(self, jobs: list[Job]) -> dict[tuple[str, str | None], list[Job]]:
        """The jobs still wanted, by lane: all LoRA/base rows together (cross_adapter), else one lane per
        adapter; a prompt/prefix-tuning adapter always gets its own. A job whose adapter was unloaded
        while it waited fails here."""
        gone = [j for j in jobs if j.adapter is not None and not self.has_adapter(j.adapter)]
        self._fail(gone, KeyError("adapter unloaded while the request waited"))
        groups: dict[tuple[str, str | None], list[Job]] = {}
        for job in jobs:
            if job in gone or job.cancelled.is_set():
                continue
            groups.setdefault(self._lane_key(job.adapter), []).append(job)
        return groups

    def _lane_key(self, adapter: str | None) -> tuple[str, str | None]:
        if self.virtual_tokens(adapter) is not None:
            return ("virtual", adapter)
        return ("lora", None if self.config.cross_adapter else adapter)

    def _drop_orphans(self) -> None:
        """Running rows whose adapter was unloaded (admin endpoint) end with an error."""
        for lane in self._lanes.values():
            gone = [i for i, r in enumerate(lane.rows) if r.job.adapter is not None and not self.has_adapter(r.job.adapter)]
            if gone:
                self._fail([lane.rows[i].job for i in gone], KeyError("adapter unloaded while the request ran"))
                for i in gone:
                    lane.rows[i].done = True
                self._retire(lane)

    def _safely(self, work: Callable, key, arg) -> None:
        """Run one prefill (arg: its jobs) or step (arg: the lane); an exception fails the requests involved,
        not the server: a failed prefill its own jobs, a failed step its whole lane."""
        try:
            work(key, arg)
        except Exception as err:
            log.exception("serving %s failed", "prefill" if isinstance(arg, list) else "step")
            self.stats.failed_batches += 1
            if isinstance(arg, list):
                jobs = [j for j in arg if not any(row.job is j for row in self._lanes.get(key, _Lane(None, None)).rows)]
            else:
                jobs = [row.job for row in self._lanes.pop(key).rows]
            self._fail(jobs, err)

    def _waiting(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                return jobs

    @staticmethod
    def _fail(jobs: Sequence[Job], err: BaseException) -> None:
        for job in jobs:
            job.events.put(Event("error", error=err))

    # ------------------------------------------------------------------ prefill and decode

    @torch.no_grad()
    def _prefill(self, key: tuple[str, str | None], jobs: list[Job]) -> None:
        """Run the prompts of `jobs` (one lane's) as one left-padded batch, sample their first tokens, and
        move the rows that go on into the lane."""
        tok = self.tokenizer
        lane = self._lanes.get(key)
        if lane is None:
            virtual = self.virtual_tokens(jobs[0].adapter) if key[0] == "virtual" else None
            head = virtual.num_virtual_tokens if virtual is not None else 0
            c = self.model.config
            cache = SlotCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.config.max_batch, head,
                              cache_dtype(self.model, self.device), self.device)
            lane = self._lanes[key] = _Lane(virtual, cache)
        rows = [_Row(j, tok.decode, tok.stop_ids, self.device) for j in jobs]
        ids, mask = left_pad([j.prompt_ids for j in jobs], tok.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = KVCache.empty(self.model.config, len(jobs), lane.cache.head + ids.shape[1],
                              lane.cache.dtype, self.device)
        out = self._forward(lane, rows, ids, mask, cache)
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self._echo(out, rows)
        for row in rows:
            if row.job.sampling.max_new_tokens == 0:
                row.finish("length")
        self._push(rows, out[:, -1].float())
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            index = torch.tensor(keep, device=self.device)
            lane.cache.join(KVCache([k[index] for k in cache.keys], [v[index] for v in cache.values]), mask[index])
            lane.rows += [rows[i] for i in keep]

    @torch.no_grad()
    def _step(self, key: tuple[str, str | None], lane: _Lane) -> None:
        """One decode step for every row of `lane`; finished rows leave it."""
        if not lane.rows:
            return
        rows = lane.rows
        pad = self.tokenizer.pad_id
        ids = torch.tensor([[pad if row.done else row.next_token] for row in rows], device=self.device)
        alive = torch.tensor([not row.done for row in rows], device=self.device)
        view = lane.cache.view()
        mask = torch.cat([lane.cache.mask, alive.long()[:, None]], dim=1)
        out = self._forward(lane, rows, ids, mask, view)
        lane.cache.advance(view, alive)
        self._push(rows, out[:, -1].float())
        self._retire(lane)

    def _forward(self, lane: _Lane, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """logits [B, T, V] of `ids` [B, T] for `rows`, each through its own adapter."""
        names = [None if lane.virtual is not None else row.job.adapter for row in rows]
        with per_row_adapters(self.model, names, self._lora_layers), self._virtual_attached(lane.virtual):
            out = self.model(ids, attention_mask=mask, cache=cache)
        s = self.stats
        s.forwards += 1
        s.max_rows = max(s.max_rows, len(rows))
        s.max_adapters = max(s.max_adapters, len({row.job.adapter for row in rows}))
        return out

    def _push(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each live row's next token from `logits` [B, V] and hand it to the row."""
        logits, nxt = self._sample(logits, rows)
        for i, (row, token) in enumerate(zip(rows, nxt.tolist())):
            if not row.done:
                row.push(token, torch.log_softmax(logits[i], -1) if row.job.logprobs is not None else None)
                row.next_token = token

    def _retire(self, lane: _Lane) -> None:
        """Finished rows leave the lane (static batching with pad_finished: only once all are finished)."""
        done = [i for i, row in enumerate(lane.rows) if row.done]
        c = self.config
        if not c.continuous and c.pad_finished and len(done) < len(lane.rows):
            return
        if done:
            order = lane.cache.leave(done)
            lane.rows = [lane.rows[i] for i in order]

    @contextlib.contextmanager
    def _virtual_attached(self, module) -> Iterator[None]:
        self.model.virtual_tokens = module
        try:
            yield
        finally:
            self.model.virtual_tokens = None

    @staticmethod
    def _echo(out: torch.Tensor, rows: list[_Row]) -> None:
        """The prompt tokens' logprobs of rows that echo them, from the prefill's logits [B, T, V]."""
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
