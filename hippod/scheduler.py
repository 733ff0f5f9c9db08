"""The scheduler alone decides what is loaded: memory guard, hot-swap, keep_alive, queueing.

Every request takes a lease on a loaded model (`async with scheduler.lease(...)`). A request for a
model that is loaded and ready takes it at once, so requests to loaded models run concurrently.
Any other request joins a *load intent*; one loader task works through the intents in arrival
order (like the pending loop of ollama's server/sched.go), so loads happen strictly one at a time,
and every request waiting for the same model is served by the same load. To make room the loader
evicts idle models, least recently used first; it never evicts a pinned model (keep_alive < 0)
and never kills one mid-request: it marks the busy victim as draining (new requests queue behind
the load instead of keeping it busy) and waits, at most `busy_wait` seconds, for its requests to
finish. A load runs to its end even if the requests that wanted it go away, so a disconnect can
neither leak a runner process nor let a second load start beside it. A runner that dies is
noticed at once and recorded as crashed (a split that lost a node while idle: as "node lost").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from hippod import audit
from hippod.config import Settings, fmt_bytes
from hippod.durations import FOREVER, parse_keep_alive  # noqa: F401  (re-exported)
from hippod.registry.registry import Registry, RegistryError
from hippod.runner_process import RunnerProcess
from hippod.runners import Forward, OnLost, Plan, Runner, RunnerFactory
from hippod.spare import SparePool
from hippod.store.database import Store
from hippod.store.records import ModelRecord

log = logging.getLogger("hippo.scheduler")

# Memory of a runner process beyond its weights and KV cache: Python, MLX, mlx_lm, tokenizer,
# batch state. Measured on Linux x86-64 CPU (Python 3.11, MLX 0.32.4, mlx_lm 0.32.2): RSS minus
# safetensors bytes was 135 MiB right after load and 140 MiB after generating, for a 6 MB random
# llama and for SmolLM2-135M 4-bit alike; rounded up to leave a little headroom.
RUNNER_OVERHEAD = 150 * 2**20
WARM_HINTS = 4  # model dirs a spare warms kernels for, the last used first
# Ollama turns keep_alive < 0 into the longest Go duration (2^63 ns, ~292 years): /api/ps shows
# that far-future time, and so do we.
LONGEST_KEEP_ALIVE = timedelta(microseconds=2**63 // 1000)


class SchedulerError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServerBusy(SchedulerError):
    def __init__(self, why: str = "maximum pending requests exceeded"):
        super().__init__(f"server busy, please try again later ({why})", 503)


class NotEnoughMemory(SchedulerError):
    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message, 507)
        self.needed = needed
        self.available = available


# -- keep_alive -------------------------------------------------------------------------------

# -- memory estimate --------------------------------------------------------------------------


def kv_cache_bytes(details: dict, num_ctx: int, num_parallel: int, layers: int | None = None) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x num_ctx x dtype bytes x parallel slots;
    `layers` counts a part of the model (one layer of a split), else all of it."""
    d = details or {}
    count = int(d.get("num_layers") or 0) if layers is None else layers
    return (2 * count * int(d.get("kv_heads") or 0)
            * int(d.get("head_dim") or 0) * num_ctx * int(d.get("kv_dtype_bytes") or 2) * num_parallel)


def prompt_cache_bytes(limit: int, details: dict, num_ctx: int, num_parallel: int) -> int:
    """What a runner's prompt cache may hold: the setting, never more than the batch's own KV
    term (a cache larger than every slot's context could never fill)."""
    return min(limit, kv_cache_bytes(details, num_ctx, num_parallel))


def estimate_bytes(rec: ModelRecord, num_ctx: int, num_parallel: int) -> int:
    """What loading `rec` will take, before loading it: weights from the safetensors headers
    (recorded at import), the KV cache for the context asked, and a runner's fixed overhead."""
    d = rec.details or {}
    weights = int(d.get("weights_bytes") or rec.size)
    return weights + kv_cache_bytes(d, num_ctx, num_parallel) + RUNNER_OVERHEAD


# -- state ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Loaded:
    name: str
    record: ModelRecord
    runner: Runner
    estimate: int
    context_length: int
    num_parallel: int
    load_id: int
    load_seconds: float
    keep_alive: float
    asked_context: int = 0  # what the load asked for; the runner may clamp to the model's limit
    measured: int = 0  # the runner's footprint at load: max(RSS, MLX active memory)
    last_used: float = field(default_factory=time.monotonic)
    refs: int = 0  # requests holding a lease now
    expires_at: datetime | None = None
    expiry: asyncio.TimerHandle | None = None
    unloading: bool = False
    draining: bool = False  # the loader waits to evict it: new requests queue instead
    end_reason: str | None = None  # why it unloads when idle ("stopped"); default "expired"
    replacing: asyncio.Future | None = None  # its runner lost a node: the successor is starting

    @property
    def pinned(self) -> bool:
        return self.keep_alive == FOREVER

    @property
    def size(self) -> int:
        """Bytes the guard counts: the estimate (KV grows into it), or what the runner really
        holds now when that is more (its RSS, read fresh; MLX's active memory at load)."""
        return max(self.estimate, self.measured, self.runner.memory())

    def expires(self) -> datetime:
        """When it unloads if nothing else uses it (a projection while it is busy)."""
        now = datetime.now(timezone.utc)
        if self.pinned:
            return now + LONGEST_KEEP_ALIVE
        if self.expires_at is not None:
            return self.expires_at
        return now + min(timedelta(seconds=self.keep_alive), LONGEST_KEEP_ALIVE)


class Lease:
    def __init__(self, loaded: Loaded, load_seconds: float):
        self.loaded = loaded
        self.runner = loaded.runner
        self.load_seconds = load_seconds  # time this request waited for its model (0 if warm)


@dataclass(eq=False)
class _Intent:
    """Requests waiting for one model to be loaded; the loader serves them all with one load."""

    rec: ModelRecord
    num_ctx: int
    keep_alive: float
    future: asyncio.Future
    waiters: int = 0
    started: bool = False


# -- the scheduler ----------------------------------------------------------------------------


class Placer(Protocol):
    """Plans splits over peers (hippod.cluster.splits.Splits); the scheduler asks it only when
    a model has a forced placement or does not fit here."""

    def forced(self, model: str, exclude: frozenset[str] = frozenset()) -> list[str] | None: ...

    def hosted_bytes(self) -> int: ...

    async def fetch(self, name: str) -> ModelRecord | None:
        """Copy a model this node lacks from a trusted peer that has it; None if none has."""

    async def locate(self, name: str, num_ctx: int | None) -> ModelRecord | Forward | None:
        """A model this node lacks: copied (as `fetch`) when it fits here or as a split, else a
        trusted peer that holds it and can run it; None if no peer has it."""

    def forward(self, target: Forward, model: str, request, keep_alive) -> AsyncIterator[object]:
        """The events of the generation `target` runs for us: a ForwardStart, then as a runner's."""

    async def forward_embed(self, target: Forward, record) -> tuple:
        """(ForwardStart, EmbedResult) of the embeddings `target` computes for us."""

    async def plan(self, rec: ModelRecord, ctx: int, local_free: int, *,
                   forced: list[str] | None = None, refusal: NotEnoughMemory | None = None,
                   exclude: frozenset[str] = frozenset()) -> Plan: ...


class Scheduler:
    def __init__(self, settings: Settings, store: Store, registry: Registry, node: str,
                 factory: RunnerFactory | None = None, placer: Placer | None = None):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.node = node
        self.loaded: dict[str, Loaded] = {}
        self.pending = 0  # requests waiting for a model to be loaded (bounded by max_queue)
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        self._intents: deque[_Intent] = deque()
        self._loader: asyncio.Task | None = None
        self._stopping: set[Loaded] = set()  # unloaded, but the process has not exited yet
        self._change_waiters: set[asyncio.Future] = set()
        self._tasks: set[asyncio.Task] = set()  # keep background tasks referenced until done
        self._closed = False
        self._load_lock = asyncio.Lock()  # loads and replacements happen one at a time
        self.factory: RunnerFactory = factory or self.start_local
        self.placer = placer
        self.hosts: list[Callable[[], int]] = []  # bytes of other things run for peers (drafts)
        self.drafts = None  # where models' drafts run (cluster.remote_drafts), when clustered
        self.spares = SparePool(settings.run_dir, settings.logs_dir / "runners.log",
                                python=settings.runner_python, enabled=settings.spare_runner,
                                start_timeout=settings.spare_start_timeout,
                                warm_max_bytes=settings.spare_warm_bytes)
        self.recent: deque[Path] = deque(maxlen=WARM_HINTS)  # model dirs loaded or unloaded last

    @property
    def active(self) -> int:
        """Requests holding a lease now (running, or queued inside a runner for a slot)."""
        return sum(m.refs for m in self.loaded.values())

    # -- memory -----------------------------------------------------------------------------

    def budget(self) -> int:
        if self.settings.memory_budget is not None:
            return self.settings.memory_budget
        total = psutil.virtual_memory().total
        budget = int(total * self.settings.memory_safety)
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            # MLX's recommended working set (Metal's recommendedMaxWorkingSetSize) is about
            # three quarters of RAM on Apple Silicon; the daemon cannot import MLX to ask.
            budget = min(budget, int(total * 0.75))
        return budget

    def used(self) -> int:
        """Loaded models, plus unloaded ones whose process is still on its way out."""
        hosted = self.placer.hosted_bytes() if self.placer is not None else 0  # layers run for peers
        hosted += sum(count() for count in self.hosts)
        return sum(m.size for m in (*self.loaded.values(), *self._stopping)) + hosted + self.spares.bytes

    def available(self) -> int:
        free = self.budget() - self.used()
        if self.settings.memory_budget is None and self.settings.guard == "strict":
            # Never load into swap: what the OS can give now must cover it too.
            free = min(free, psutil.virtual_memory().available)
        return max(free, 0)

    def estimate(self, rec: ModelRecord, num_ctx: int, num_parallel: int) -> int:
        """estimate_bytes plus what this daemon's engine settings add: the prompt cache (kept
        no larger than the batch's own KV term) and a draft model's weights, when it runs here."""
        d = rec.details or {}
        cache = prompt_cache_bytes(self.settings.prompt_cache_bytes, d, num_ctx, num_parallel)
        draft = self._draft_here(rec)
        return estimate_bytes(rec, num_ctx, num_parallel) + cache + (_weights(draft) if draft else 0)

    def _draft_for(self, rec: ModelRecord) -> ModelRecord | None:
        """The model's own draft (catalog entry or `create --draft`), when it is here."""
        name = (rec.details or {}).get("draft")
        if not name:
            return None
        try:
            draft = self.registry.get(name)
        except RegistryError:
            return None
        return None if draft.missing or draft.digest == rec.digest else draft

    def _draft_here(self, rec: ModelRecord) -> ModelRecord | None:
        """The model's draft when this node runs it: a draft placed on a peer weighs nothing
        here (the peer's guard counts it), and a runner whose peer fails loads without one."""
        if self.drafts is not None and self.drafts.placed_on(rec.name):
            return None
        return self._draft_for(rec)

    def _engine_args(self, rec: ModelRecord, ctx: int, parallel: int, draft_here: bool = True) -> list[str]:
        d = rec.details or {}
        cache = prompt_cache_bytes(self.settings.prompt_cache_bytes, d, ctx, parallel)
        args = ["--num-draft", str(self.settings.num_draft), "--prompt-cache-bytes", str(cache),
                "--draft-policy", self.settings.draft_policy, "--prefill-batch", str(self.settings.prefill_batch)]
        draft = self._draft_here(rec) if draft_here else None
        if draft is not None:
            args += ["--draft", str(self.registry.model_dir(draft))]
        elif 0 < self.settings.self_draft_layers < int(d.get("num_layers") or 0):
            args += ["--self-draft-layers", str(self.settings.self_draft_layers)]
        return args

    def context_for(self, rec: ModelRecord, num_ctx: int | None) -> int:
        """The context a request needs: num_ctx or the default, never more than the model has."""
        want = int(num_ctx) if num_ctx else self.settings.num_ctx
        return max(1, min(want, rec.context_length) if rec.context_length else want)

    # -- leases -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, *, keep_alive: object = None, num_ctx: int | None = None):
        try:
            keep = self.default_keep_alive if keep_alive is None else parse_keep_alive(keep_alive)
        except ValueError as e:
            raise SchedulerError(str(e), 400) from None
        loaded, load_seconds = await self._acquire(name, num_ctx, keep)
        try:
            yield Lease(loaded, load_seconds)
        finally:
            self._release(loaded)

    async def record(self, name: str) -> ModelRecord:
        """The model's record; a model that only a trusted peer has is copied from it first."""
        try:
            return self.registry.get(name)
        except RegistryError as e:
            if e.status != 404 or self.placer is None:
                raise
            rec = await self.placer.fetch(self.registry.normalize(name))
            if rec is None:
                raise
            audit.note_model_source(f"copied from peer {_peer_of(rec)}")
            return rec

    async def where(self, name: str, num_ctx: int | None = None, *, forward: bool = True
                    ) -> ModelRecord | Forward:
        """Where a request for `name` is served: here (its record; a model that only a trusted
        peer holds is copied first when it fits here or as a split), or, when neither fits, on a
        trusted peer that holds it and can run it (`forward` False: never; a forwarded request
        is not forwarded again)."""
        if not forward or self.placer is None:
            return await self.record(name)
        try:
            return self.registry.get(name)
        except RegistryError as e:
            if e.status != 404:
                raise
            found = await self.placer.locate(self.registry.normalize(name), num_ctx)
            if found is None:
                raise
        if isinstance(found, Forward):
            audit.note_model_source(f"forwarded to {found.peer}")
        else:
            audit.note_model_source(f"copied from peer {_peer_of(found)}")
        return found

    def forward(self, target: Forward, model: str, request, keep_alive) -> AsyncIterator[object]:
        assert self.placer is not None
        return self.placer.forward(target, model, request, keep_alive)

    async def forward_embed(self, target: Forward, record) -> tuple:
        assert self.placer is not None
        return await self.placer.forward_embed(target, record)

    async def _acquire(self, name: str, num_ctx: int | None, keep: float) -> tuple[Loaded, float]:
        rec = await self.record(name)
        if rec.missing:
            raise RegistryError(f"model '{rec.name}' has missing files; pull or create it again", 500)
        ctx = self.context_for(rec, num_ctx)
        m = self._ready(rec, ctx)
        if m is not None:
            self._hold(m, 1)
            self._touch(m, keep)
            return m, 0.0
        if self._closed:
            raise SchedulerError("hippod is shutting down", 503)
        if self.pending >= self.settings.max_queue:
            raise ServerBusy(f"{self.pending} requests are already waiting for a model")
        t0 = time.monotonic()
        intent = self._join(rec, ctx, keep)
        self.pending += 1
        try:
            m = await asyncio.shield(intent.future)
        except asyncio.CancelledError:
            # The client went away. If the load already counted it, give its lease back.
            if intent.future.done() and not intent.future.cancelled() and intent.future.exception() is None:
                self._release(intent.future.result())
            else:
                intent.waiters -= 1
            raise
        finally:
            self.pending -= 1
        self._touch(m, keep)
        return m, time.monotonic() - t0

    def _ready(self, rec: ModelRecord, ctx: int) -> Loaded | None:
        m = self.loaded.get(rec.name)
        if (m is None or m.unloading or m.draining or m.replacing or not m.runner.alive
                or m.runner.outdated  # e.g. its draft's peer session is gone
                or m.record.digest != rec.digest
                or ctx > max(m.context_length, m.asked_context)):  # reloading would not give more
            return None
        return m

    def _join(self, rec: ModelRecord, ctx: int, keep: float) -> _Intent:
        """Wait with others for the same model, or queue a new load behind the ones waiting."""
        for intent in reversed(self._intents):
            if intent.rec.name != rec.name:
                continue
            if intent.rec.digest == rec.digest and (not intent.started or ctx <= intent.num_ctx):
                intent.num_ctx = max(intent.num_ctx, ctx)
                intent.keep_alive = keep
                intent.waiters += 1
                return intent
            break
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
        intent = _Intent(rec, ctx, keep, future, waiters=1)
        self._intents.append(intent)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.ensure_future(self._load_loop())
        return intent

    def _hold(self, m: Loaded, n: int) -> None:
        m.refs += n
        self.spares.set_busy(self.active > 0)
        m.last_used = time.monotonic()
        if m.expiry:
            m.expiry.cancel()
            m.expiry = None
        m.expires_at = None

    def _touch(self, m: Loaded, keep: float) -> None:
        """A request's keep_alive replaces the one before, as in Ollama."""
        m.keep_alive = keep
        m.end_reason = None
        m.last_used = time.monotonic()

    def _release(self, m: Loaded) -> None:
        m.refs -= 1
        self.spares.set_busy(self.active > 0)
        m.last_used = time.monotonic()
        if m.refs == 0 and self.loaded.get(m.name) is m and not m.unloading:
            self._arm_expiry(m)
        self._notify()

    def _arm_expiry(self, m: Loaded) -> None:
        if m.expiry:
            m.expiry.cancel()
            m.expiry = None
        if m.pinned:
            m.expires_at = None
            return
        delay = min(m.keep_alive, LONGEST_KEEP_ALIVE.total_seconds())
        m.expires_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        if delay <= 0:
            self._spawn(self._expire(m))
        else:
            m.expiry = asyncio.get_running_loop().call_later(
                min(delay, 10 * 365 * 86400), lambda: self._spawn(self._expire(m)))

    async def _expire(self, m: Loaded) -> None:
        if m.refs == 0 and self.loaded.get(m.name) is m:
            await self.unload(m.name, m.end_reason or "expired")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- waiting for changes ----------------------------------------------------------------

    def _notify(self) -> None:
        for f in self._change_waiters:
            if not f.done():
                f.set_result(None)
        self._change_waiters.clear()

    async def _wait_change(self, timeout: float) -> None:
        """Until a lease is released or a model goes away, or `timeout` seconds pass."""
        f = asyncio.get_running_loop().create_future()
        self._change_waiters.add(f)
        try:
            await asyncio.wait({f}, timeout=max(timeout, 0))
        finally:
            self._change_waiters.discard(f)

    # -- the loader: one load at a time -----------------------------------------------------

    async def _load_loop(self) -> None:
        while self._intents:
            intent = self._intents[0]
            if intent.waiters <= 0:  # everyone who wanted it went away before it started
                self._intents.popleft()
                intent.future.cancel()
                continue
            intent.started = True
            try:
                current = self.loaded.get(intent.rec.name)
                if current is not None and current.replacing is not None:  # wait for its successor
                    await asyncio.wait({current.replacing})
                async with self._load_lock:
                    m = await self._satisfy(intent)
            except asyncio.CancelledError:
                if not intent.future.done():
                    intent.future.set_exception(SchedulerError("hippod is shutting down", 503))
                raise
            except Exception as e:  # a failed load fails the requests that wanted it, nothing more
                intent.future.set_exception(e)
            else:
                # Count every waiter as holding a lease before anything else can run, so the
                # next intent cannot evict the model between the load and its first request.
                self._hold(m, intent.waiters)
                if intent.waiters:
                    intent.future.set_result(m)
                else:  # nobody waits any more: it stays loaded for the keep_alive asked
                    intent.future.cancel()
                    m.keep_alive = intent.keep_alive
                    if m.refs == 0:
                        self._arm_expiry(m)
            finally:
                self._intents.popleft()
                self._notify()

    async def _satisfy(self, intent: _Intent) -> Loaded:
        rec, ctx = intent.rec, intent.num_ctx
        m = self._ready(rec, ctx)
        if m is not None:  # an earlier load (or a request that raced us) already brought it
            return m
        deadline = time.monotonic() + self.settings.busy_wait
        current = self.loaded.get(rec.name)
        if current is not None:  # another version, a smaller context, or a dead runner
            try:
                await self._evict(current, "replaced" if current.runner.alive else "crashed",
                                  deadline)
            except _StillBusy:
                raise ServerBusy(f"'{rec.name}' must be reloaded (another version or a larger "
                                 f"context) but stayed busy for {self.settings.busy_wait:.0f}s"
                                 ) from None
        plan = await self._place(rec, ctx, deadline)
        return await self._start(plan, intent.keep_alive)

    async def _place(self, rec: ModelRecord, ctx: int, deadline: float,
                     exclude: frozenset[str] = frozenset(), keep: Loaded | None = None) -> Plan:
        """Where `rec` runs: here (after evicting idle models if need be), or split over peers
        when it has a forced placement or does not fit here; never on the nodes in `exclude`."""
        parallel = self.settings.num_parallel
        need = self.estimate(rec, ctx, parallel)
        placer = self.placer
        forced = placer.forced(rec.name, exclude) if placer is not None else None
        if forced:
            return await placer.plan(rec, ctx, self.available(), forced=forced, exclude=exclude)
        try:
            await self._make_room(rec.name, need, deadline, keep)
        except NotEnoughMemory as refusal:
            plan = await self._draft_elsewhere(rec, ctx, need, deadline, keep)
            if plan is not None:
                return plan
            if placer is None:
                raise
            return await placer.plan(rec, ctx, self.available(), refusal=refusal, exclude=exclude)
        return Plan(rec, ctx, parallel, need, tuple(self._engine_args(rec, ctx, parallel)))

    async def _draft_elsewhere(self, rec: ModelRecord, ctx: int, need: int, deadline: float,
                               keep: Loaded | None) -> Plan | None:
        """The model with its draft on a trusted peer that holds the draft and advertises the
        memory for it, when the model fits here only without its draft. Only then: drafting
        here costs no round trip per round, so a draft that fits stays here."""
        draft = self._draft_here(rec)
        if draft is None or self.drafts is None:
            return None
        peer = self.drafts.peer_holding(draft.name, _weights(draft) + RUNNER_OVERHEAD)
        if peer is None:
            return None
        try:
            await self._make_room(rec.name, need - _weights(draft), deadline, keep)
        except NotEnoughMemory:
            return None
        log.info("%s drafts on %s: its draft does not fit here", rec.name, peer)
        parallel = self.settings.num_parallel
        return Plan(rec, ctx, parallel, need - _weights(draft),
                    tuple(self._engine_args(rec, ctx, parallel, draft_here=False)), draft_on=peer)

    async def _make_room(self, name: str, need: int, deadline: float, keep: Loaded | None = None) -> None:
        guard = self.settings.guard
        budget = self.budget()
        if guard == "strict" and need > budget:
            raise NotEnoughMemory(
                f"model '{name}' needs {fmt_bytes(need)} ({need} bytes) but the memory budget is "
                f"only {fmt_bytes(budget)} ({budget} bytes)", need, budget)
        while True:
            others = [m for m in self.loaded.values() if m is not keep]  # `keep`: being replaced
            too_many = len(others) >= self.settings.max_loaded_models
            # A ready spare becomes this load's runner: its memory is part of what `need` counts.
            short = guard != "off" and need > self.available() + self.spares.ready_bytes
            if not too_many and not short:
                return
            if short and self.spares.starting and await self.spares.discard():
                continue  # a spare still starting goes before any model
            evictable = [m for m in others if not m.pinned]
            idle = [m for m in evictable if m.refs == 0]
            if short and not too_many and guard == "warn" and not idle:
                log.warning("memory guard (warn): loading %s without room (%s needed, %s available)",
                            name, fmt_bytes(need), fmt_bytes(self.available()))
                return
            if not evictable:
                pinned = ", ".join(self.loaded)
                if too_many:
                    raise ServerBusy(f"{len(self.loaded)} models are loaded (max_loaded_models) and "
                                     f"pinned by keep_alive<0: {pinned}")
                self._refuse(name, need, f"; pinned by keep_alive<0: {pinned}" if pinned else "")
            victim = (min(idle, key=lambda m: m.last_used) if idle
                      else min(evictable, key=lambda m: (m.refs, m.last_used)))
            try:
                await self._evict(victim, "evicted", deadline)
            except _StillBusy:
                if too_many:
                    raise ServerBusy(f"{len(self.loaded)} models are loaded (max_loaded_models) and "
                                     f"stayed busy for {self.settings.busy_wait:.0f}s") from None
                self._refuse(name, need, f"; the loaded models stayed busy for "
                                         f"{self.settings.busy_wait:.0f}s")

    async def make_room_for_share(self, label: str, need: int) -> None:
        """A peer asks this node to hold part of a split: evict idle models, least recently used
        first, until `need` bytes are free. Pinned and busy models are never evicted for it."""
        if self.settings.guard == "off":
            return
        async with self._load_lock:
            while need > self.available():
                if await self.spares.discard(f"to make room for {label}"):
                    continue  # the spare (and its warm-up allowance) goes before any model
                idle = [m for m in self.loaded.values()
                        if not m.pinned and m.refs == 0 and m.replacing is None and not m.unloading]
                if not idle:
                    self._refuse(label, need, "; the models loaded here are busy or pinned"
                                 if self.loaded else "", what=label)
                await self.unload(min(idle, key=lambda m: m.last_used).name, "evicted")

    def _refuse(self, name: str, need: int, why: str, what: str | None = None):
        free = self.available()
        what = what or f"model '{name}'"
        raise NotEnoughMemory(
            f"{what} needs {fmt_bytes(need)} ({need} bytes) but only {fmt_bytes(free)} "
            f"({free} bytes) of the {fmt_bytes(self.budget())} memory budget is available{why}",
            need, free)

    async def _evict(self, m: Loaded, reason: str, deadline: float) -> None:
        """Unload `m` once its requests are done; meanwhile new requests for it queue up."""
        m.draining = True
        try:
            while m.refs > 0 and self.loaded.get(m.name) is m and m.runner.alive:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _StillBusy()
                await self._wait_change(remaining)
        finally:
            m.draining = False
        if self.loaded.get(m.name) is m:
            await self.unload(m.name, reason)

    async def _launch(self, plan: Plan) -> tuple[Runner, float]:
        where = (" over " + ", ".join(f"{x.node} layers {x.layers}" for x in plan.shares)
                 if plan.split else "")
        log.info("loading %s%s (estimated %s here, %s in use of %s)", plan.record.name, where,
                 fmt_bytes(plan.estimate), fmt_bytes(self.used()), fmt_bytes(self.budget()))
        t0 = time.monotonic()
        runner = await self.factory(plan, self.replace)
        return runner, time.monotonic() - t0

    def _open_load(self, plan: Plan, runner: Runner, seconds: float) -> tuple[int, int]:
        """The store's row for a runner that just started: (load id, measured bytes)."""
        ready = runner.ready
        measured = max(ready.rss_bytes, ready.mlx_active_bytes) if ready else 0
        load_id = self.store.start_load(plan.record.name, self.node, "split" if plan.split else "request",
                                        max(plan.total, measured), seconds, pid=runner.pid)
        return load_id, measured

    async def _start(self, plan: Plan, keep: float) -> Loaded:
        """Start a runner for `plan` and register it: the one path for every loaded model."""
        runner, seconds = await self._launch(plan)
        try:
            load_id, measured = self._open_load(plan, runner, seconds)
        except BaseException:
            await runner.kill()
            raise
        rec = plan.record
        m = Loaded(rec.name, rec, runner, estimate=plan.estimate,
                   context_length=runner.ready.context_length if runner.ready else plan.num_ctx,
                   num_parallel=plan.num_parallel, load_id=load_id, load_seconds=seconds,
                   keep_alive=keep, asked_context=plan.num_ctx, measured=measured)
        self.loaded[rec.name] = m
        self._spawn(self._watch(m))
        self._used(rec)
        self.spares.refill(self.available(), list(self.recent))
        log.info("loaded %s in %.2fs (pid %s, counted %s)", rec.name, seconds, runner.pid,
                 fmt_bytes(m.size))
        return m

    async def start_local(self, plan: Plan, on_lost: OnLost) -> Runner:
        """The default factory: one runner process on this node (it cannot lose a node)."""
        rec = plan.record
        runner = RunnerProcess(
            self.registry.model_dir(rec), self.settings.run_dir,
            self.settings.logs_dir / "runners.log", num_parallel=plan.num_parallel,
            context_length=plan.num_ctx, python=self.settings.runner_python,
            extra_args=list(plan.engine_args))
        try:
            await runner.start(timeout=self.settings.load_timeout, spare=self.spares.take())
        except BaseException:  # failed, timed out, or shutting down: leave no process behind
            await runner.kill()
            raise
        return runner

    async def replace(self, old: Runner, lost: frozenset[str]) -> Runner:
        """A runner lost nodes mid-stream: plan its model again without them (here, if it now
        fits after evicting idle models, or over the nodes that are left), start the successor
        and register it in the old one's place, keeping the model's leases and keep_alive.
        Raises (with the numbers) when no placement fits; the model is then unloaded."""
        m = next((x for x in self.loaded.values() if x.runner is old), None)
        if m is None or m.unloading:
            raise SchedulerError("the model was unloaded while its runner lost a node", 503)
        if m.replacing is not None:
            return await asyncio.shield(m.replacing)
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        m.replacing = done
        try:
            async with self._load_lock:
                m.estimate = m.measured = 0  # the old runner is gone here: its memory is free
                deadline = time.monotonic() + self.settings.busy_wait
                plan = await self._place(m.record, m.asked_context, deadline, exclude=lost, keep=m)
                runner, seconds = await self._launch(plan)
            if m.unloading or self.loaded.get(m.name) is not m:  # unloaded meanwhile: leave nothing
                await runner.kill()
                raise SchedulerError(f"'{m.name}' was unloaded while its runner lost a node", 503)
            self.store.end_load(m.load_id, "node lost")
            m.load_id, m.measured = self._open_load(plan, runner, seconds)
            m.runner, m.estimate, m.load_seconds = runner, plan.estimate, seconds
            m.num_parallel = plan.num_parallel
            if runner.ready:
                m.context_length = runner.ready.context_length
            log.info("%s continues on %s after losing %s", m.name,
                     ", ".join(plan.nodes) if plan.split else self.node, ", ".join(sorted(lost)) or "its runner")
            done.set_result(runner)
            return runner
        except BaseException as e:
            done.set_exception(e if isinstance(e, Exception) else SchedulerError("hippod is shutting down", 503))
            if self.loaded.get(m.name) is m:
                self._spawn(self.unload(m.name, "node lost"))
            raise
        finally:
            m.replacing = None
            self._notify()

    def _used(self, rec: ModelRecord) -> None:
        """`rec` was loaded or unloaded just now: the next spare warms for it first."""
        try:
            path = self.registry.model_dir(rec)
        except Exception:  # a model whose files are gone: nothing to warm for
            return
        if path in self.recent:
            self.recent.remove(path)
        self.recent.appendleft(path)

    # -- unloading --------------------------------------------------------------------------

    async def unload(self, name: str, reason: str) -> bool:
        """Kill the model's runner now, busy or not (eviction waits for idle before calling)."""
        m = self.loaded.pop(name, None)
        if m is None:
            return False
        m.unloading = True
        if m.expiry:
            m.expiry.cancel()
            m.expiry = None
        self._used(m.record)
        self._stopping.add(m)
        try:
            # Shielded: a caller that goes away must not leave a half-stopped runner behind.
            await asyncio.shield(self._finish_unload(m, reason))
        finally:
            self._notify()
        return True

    async def _finish_unload(self, m: Loaded, reason: str) -> None:
        try:
            await m.runner.stop()
        finally:
            self._stopping.discard(m)
            self.store.end_load(m.load_id, reason)
            log.info("unloaded %s (%s)", m.name, reason)
            self._notify()

    async def stop(self, name: str) -> bool:
        """keep_alive 0 with no prompt (`ollama stop`): unload now if idle, else as soon as the
        requests it is serving end (Ollama's expireRunner); a later request can change that."""
        m = self.loaded.get(name)
        if m is None:
            return False
        m.keep_alive = 0
        m.end_reason = "stopped"
        if m.refs == 0:
            return await self.unload(name, "stopped")
        return True

    async def _watch(self, m: Loaded) -> None:
        while True:
            runner = m.runner
            await runner.exited.wait()
            if m.replacing is not None:  # it lost a node: follow its successor
                await asyncio.wait({m.replacing})
            if m.runner is runner:
                break
        if m.unloading:
            return
        log.error("runner of %s exited unexpectedly (code %s): %s", m.name, runner.exit_code,
                  runner.health())
        if self.loaded.get(m.name) is m:
            del self.loaded[m.name]
        if m.expiry:
            m.expiry.cancel()
            m.expiry = None
        self.store.end_load(m.load_id, runner.end_reason)
        self._notify()

    async def shutdown(self) -> None:
        self._closed = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()  # a load in progress is killed by _start
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader
        for intent in self._intents:
            if not intent.future.done():
                intent.future.set_exception(SchedulerError("hippod is shutting down", 503))
        self._intents.clear()
        for name in list(self.loaded):
            await self.unload(name, "shutdown")
        await self.spares.close()


class _StillBusy(Exception):
    """The model to evict kept serving requests past busy_wait."""


def _peer_of(rec: ModelRecord) -> str:
    return rec.source.removeprefix("peer:") if rec.source.startswith("peer:") else "a peer"


def _weights(rec: ModelRecord) -> int:
    return int((rec.details or {}).get("weights_bytes") or rec.size)
