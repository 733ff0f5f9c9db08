"""The audit log: one row per inference request, written when the request ends.

A middleware opens a `Trace` for each inference route and puts it in a context variable; the
Generation (and embed) of that request fill in what only they know (model, tokens, timings)
without the route handlers passing anything along. So every route that runs a Generation, in
either API, is audited, and a request refused before it reached a model is audited too.

Rows are written by `Writer`, off the event loop and several to a transaction: a request that
ends never holds up the requests arriving beside it on an SQLite write. Requests refused for
want of credentials (401, 403) come from anyone who can reach the port, so at most
REFUSED_PER_MINUTE of them are written a minute; the rest are counted in one log line a
minute, and the log cannot be made to fill the disk by a flood.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from aiohttp import web

from hippod.protocol import FORWARD_EMBED_PATH, FORWARD_PATH
from hippod.store.database import Store
from hippod.store.records import RequestRecord

log = logging.getLogger("hippo.audit")

# Routes that run a model; everything else (tags, ps, pull, ...) is counted by metrics only.
INFERENCE_ROUTES = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    FORWARD_PATH, FORWARD_EMBED_PATH,  # a peer's client, run here (the client column: its address)
})
PROMPT_LIMIT = 64 * 1024  # characters of prompt text kept per row when HIPPO_AUDIT_PROMPTS=1
REFUSED_PER_MINUTE = 60  # unauthenticated refusals written to the log a minute (the rest counted)
REFUSED = (401, 403)


@dataclass
class Trace:
    """What one inference request did; filled in by the middleware and the Generation."""

    route: str
    client: str
    keep_prompt: bool = False
    at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    t0: float = field(default_factory=time.perf_counter)
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and those the target kept
    accepted_tokens: int = 0
    load_seconds: float = 0.0
    eval_seconds: float = 0.0
    ttft_seconds: float | None = None
    error: str | None = None
    prompt: str | None = None
    model_source: str | None = None  # "local" unless the model came from elsewhere (note_model_source)
    status: int = 0
    total_seconds: float = 0.0
    answered: bool = False  # the last byte of the answer's content was written (note_answered)

    def record(self) -> RequestRecord:
        return RequestRecord(client=self.client, endpoint=self.route, status=self.status,
                             model=self.model, prompt_tokens=self.prompt_tokens,
                             completion_tokens=self.completion_tokens,
                             total_seconds=self.total_seconds, ttft_seconds=self.ttft_seconds,
                             error=self.error, prompt=self.prompt,
                             model_source=self.model_source, time=self.at)


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("hippo_trace", default=None)


def _prompt_text(request) -> str:
    """The prompt as the client sent it: text, or the messages as JSON."""
    if getattr(request, "messages", None):
        text = json.dumps(request.messages, ensure_ascii=False, default=str)
    else:
        text = "\n".join(p for p in (getattr(request, "system", None), getattr(request, "prompt", None)) if p)
    return text[:PROMPT_LIMIT]


def note_model_source(source: str) -> None:
    """The model this request named was not here: say how this node got it (the scheduler
    calls this as it copies the model from a peer, in the request's own task)."""
    trace = _current.get()
    if trace is not None:
        trace.model_source = source


def _served(trace: Trace, model: str, leased: bool = True) -> None:
    trace.model = model
    if leased:  # a request refused before it reached a model got it from nowhere
        trace.model_source = trace.model_source or "local"


def note_generation(gen) -> None:
    """Called as a Generation closes: copy what it knows into this request's trace."""
    trace = _current.get()
    if trace is None:
        return
    _served(trace, gen.model_name, gen.lease is not None)
    trace.load_seconds = gen.load_seconds
    if gen.first_event_at is not None:
        trace.ttft_seconds = gen.first_event_at - trace.t0
    if gen.done is not None:
        trace.prompt_tokens = gen.done.prompt_tokens
        trace.completion_tokens = gen.done.completion_tokens
        trace.eval_seconds = gen.done.eval_seconds
        trace.drafted_tokens, trace.accepted_tokens = gen.done.drafted, gen.done.accepted
    if gen.error is not None and trace.error is None:
        trace.error = gen.error
    if trace.keep_prompt:
        trace.prompt = _prompt_text(gen.request)


def note_answered() -> None:
    """The whole answer has been written: a client that hangs up now, before the stream's
    end marker, was served (a 200 in the log), not cut off (a 499)."""
    trace = _current.get()
    if trace is not None:
        trace.answered = True


def note_embedding(model: str, inputs: list[str], prompt_tokens: int, load_seconds: float) -> None:
    trace = _current.get()
    if trace is None:
        return
    _served(trace, model)
    trace.prompt_tokens = prompt_tokens
    trace.load_seconds = load_seconds
    if trace.keep_prompt:
        trace.prompt = json.dumps(inputs, ensure_ascii=False)[:PROMPT_LIMIT]


class Writer:
    """Audit rows, written from a worker thread in the order they were queued. `flush()`
    returns once every row queued before it is in the store: readers of the log call it first,
    and the app's cleanup calls it last, so a row is never lost to a clean shutdown."""

    def __init__(self, store: Store):
        self.store = store
        self.queued: list[RequestRecord] = []
        self._task: asyncio.Task | None = None
        self._minute = time.monotonic()
        self._refused = 0  # refusals seen this minute

    def add(self, rec: RequestRecord) -> None:
        """Queue a row (never fails, never waits: it runs as a cancelled request ends too)."""
        if rec.status in REFUSED and not self._room_for_refusal():
            return
        self.queued.append(rec)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def _room_for_refusal(self) -> bool:
        now = time.monotonic()
        if now - self._minute >= 60:
            if self._refused > REFUSED_PER_MINUTE:
                log.warning("audit: %d refused request(s) in the last minute; %d written to the log",
                            self._refused, REFUSED_PER_MINUTE)
            self._minute, self._refused = now, 0
        self._refused += 1
        return self._refused <= REFUSED_PER_MINUTE

    async def _drain(self) -> None:
        while self.queued:
            rows, self.queued = self.queued, []
            try:
                await asyncio.to_thread(self.store.add_requests, rows)
            except Exception:
                log.exception("could not write %d audit row(s)", len(rows))

    async def flush(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


async def flush_on_cleanup(app: web.Application) -> None:
    await app["audit"].flush()


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


@web.middleware
async def audit_middleware(request: web.Request, handler):
    """Open a trace for inference routes; write its row however the request ends."""
    if request.method != "POST" or request.path not in INFERENCE_ROUTES:
        return await handler(request)
    trace = Trace(route=request.path, client=_client(request),
                  keep_prompt=request.app["settings"].audit_prompts)
    request["trace"] = trace
    token = _current.set(trace)
    try:
        resp = await handler(request)
        trace.status = resp.status
        if resp.status >= 400 and trace.error is None:
            trace.error = _error_text(resp)
        return resp
    except web.HTTPException as exc:
        trace.status = exc.status
        raise
    except asyncio.CancelledError:
        if trace.answered:
            trace.status = 200
        else:
            trace.status, trace.error = 499, trace.error or "cancelled (client went away or shutdown)"
        raise
    except BaseException as exc:
        trace.status, trace.error = 500, trace.error or f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _current.reset(token)
        trace.total_seconds = time.perf_counter() - trace.t0
        if trace.status >= 400 and trace.error is None:
            trace.error = "client disconnected" if trace.status == 499 else f"HTTP {trace.status}"
        request.app["audit"].add(trace.record())  # queued even when cancelled


def _error_text(resp: web.StreamResponse) -> str | None:
    """The message of an error answer, in either API's shape (see errors.py)."""
    body = getattr(resp, "body", None)
    try:
        err = json.loads(body).get("error") if isinstance(body, bytes) else None
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err)[:2000] if err else None


async def prune(store: Store, retention_days: float) -> int:
    if retention_days <= 0:
        return 0
    cutoff = datetime.now(timezone.utc) - timedelta(days=retention_days)
    removed = await asyncio.to_thread(store.prune_requests, cutoff)
    if removed:
        log.info("audit: pruned %d request row(s) older than %g day(s)", removed, retention_days)
    return removed


async def prune_periodically(store: Store, retention_days: float, every: float = 3600.0) -> None:
    """Keep the audit log within its retention, for a daemon that runs for months."""
    while True:
        try:
            await prune(store, retention_days)
        except Exception:
            log.exception("audit: pruning failed")
        await asyncio.sleep(every)
