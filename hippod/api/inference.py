"""One generation as both APIs see it: take a lease, stream runner events, always let go.

`start()` does everything that can fail with a clean HTTP status (unknown model, no memory,
busy) before a handler commits to a 200 stream; errors after that become an error line.
A model that only a trusted peer can run is forwarded there (cluster/forward.py): the events
come from the peer instead of a lease, and the handlers cannot tell the difference.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator

from hippod import audit
from hippod.api import defaults
from hippod.protocol import (DoneEvent, EmbedRequest, EmbedResult, ForwardEmbed, ForwardStart, GenerateRequest,
                             TokenEvent)
from hippod.runners import Forward
from hippod.scheduler import Lease, Scheduler


class Generation:
    def __init__(self, scheduler: Scheduler, model: str, request: GenerateRequest, keep_alive=None, *,
                 forward: bool = True):
        self.scheduler = scheduler
        self.forward = forward  # False for a request a peer forwarded to us: it goes no further
        self.forwarded: ForwardStart | None = None  # a peer runs it: the model that answers there
        self.model = model
        self.request = request
        self.keep_alive = keep_alive
        self.started = time.perf_counter()
        self.lease: Lease | None = None
        self.done: DoneEvent | None = None
        self._stack = contextlib.AsyncExitStack()
        self._events = None
        self._first = None
        self.first_event_at: float | None = None  # perf_counter of the runner's first event
        self.error: str | None = None  # why the stream broke off, for the audit log

    @property
    def model_name(self) -> str:
        if self.forwarded is not None:
            return self.forwarded.model
        return self.lease.loaded.name if self.lease else self.model

    @property
    def digest(self) -> str:
        """The weights' digest (OpenAI's system_fingerprint is made from it)."""
        return self.forwarded.digest if self.forwarded is not None else self.lease.loaded.record.digest

    async def start(self) -> "Generation":
        try:
            registry = self.scheduler.registry
            # Copied from a trusted peer if only it has it, or forwarded to one that can run it.
            rec = await self.scheduler.where(self.model, self.request.options.get("num_ctx"),
                                             forward=self.forward)
            if isinstance(rec, Forward):
                await self._start_forwarded(rec)
                return self
            self.request = defaults.apply(self.request, rec, registry.model_dir(rec))
            num_ctx = self.request.options.get("num_ctx")
            draft_on = self.request.options.pop("draft_on", None)  # an option of the load, not the runner
            if draft_on is not None and self.scheduler.drafts is not None:
                await self.scheduler.drafts.follow(rec.name, draft_on)
            self.lease = await self._stack.enter_async_context(
                self.scheduler.lease(self.model, keep_alive=self.keep_alive, num_ctx=num_ctx))
            self._events = self.lease.runner.generate(self.request)
            await self._stack.enter_async_context(contextlib.aclosing(self._events))
            # Wait for the first event so a request the runner rejects (e.g. a chat template
            # error) still gets its own status instead of an error line inside a 200 stream.
            self._first = await self._events.__anext__()
            self.first_event_at = time.perf_counter()
        except BaseException:
            await self._stack.aclose()
            audit.note_generation(self)
            raise
        return self

    async def _start_forwarded(self, target: Forward) -> None:
        """The peer applies its own defaults to the request as the client sent it."""
        self._events = self.scheduler.forward(target, self.model, self.request, self.keep_alive)
        await self._stack.enter_async_context(contextlib.aclosing(self._events))
        self.forwarded = await self._events.__anext__()  # cluster/frames.py checks it is a ForwardStart
        self._first = await self._events.__anext__()
        self.first_event_at = time.perf_counter()

    async def _all_events(self):
        yield self._first
        async for event in self._events:
            yield event

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            async for event in self._all_events():
                if isinstance(event, DoneEvent):
                    self.done = event
                    return
                yield event
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            raise

    async def close(self) -> None:
        try:
            await self._stack.aclose()
        finally:
            audit.note_generation(self)  # one hook serves every route of both APIs

    @property
    def load_seconds(self) -> float:
        if self.forwarded is not None:
            return self.forwarded.load_seconds
        return self.lease.load_seconds if self.lease else 0.0

    @property
    def total_seconds(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class Served:
    """The model that answered an embedding request (here or on a peer) and its load time."""

    name: str
    digest: str
    load_seconds: float


async def embed(scheduler: Scheduler, model: str, inputs: list[str], *, truncate: bool,
                keep_alive=None, num_ctx: int | None = None, forward: bool = True) -> tuple[EmbedResult, Served]:
    """Embeddings by the model here, or by the trusted peer a model only it can run is
    forwarded to (`forward` False for a request a peer forwarded to us)."""
    target = await scheduler.where(model, num_ctx, forward=forward)
    if isinstance(target, Forward):
        start, result = await scheduler.forward_embed(target, ForwardEmbed(model, inputs, truncate, num_ctx,
                                                                           keep_alive))
        audit.note_embedding(start.model, inputs, result.prompt_tokens, start.load_seconds)
        return result, Served(start.model, start.digest, start.load_seconds)
    async with scheduler.lease(model, keep_alive=keep_alive, num_ctx=num_ctx) as lease:
        result = await lease.runner.embed(EmbedRequest(inputs, truncate=truncate, num_ctx=num_ctx))
        audit.note_embedding(lease.loaded.name, inputs, result.prompt_tokens, lease.load_seconds)
        return result, Served(lease.loaded.name, lease.loaded.record.digest, lease.load_seconds)
