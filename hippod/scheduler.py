"""The scheduler alone decides what is loaded: memory guard, hot-swap, keep_alive, queueing.

Every request takes a lease on a loaded model (`async with scheduler.lease(...)`). Loads happen
one at a time under one lock; to make room the scheduler evicts idle models, least recently used
first, never a pinned one (keep_alive < 0) and never one that is serving a request (it waits for
it, bounded). A runner that dies is noticed at once and recorded as crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import psutil

from hippod.config import Settings
from hippod.registry.registry import Registry, RegistryError
from hippod.runner_process import RunnerError, RunnerProcess
from hippod.store.database import Store
from hippod.store.records import ModelRecord

log = logging.getLogger("hippo.scheduler")

RUNNER_OVERHEAD = 300 * 2**20  # Python + MLX runtime of a runner process, measured on Linux CPU
FOREVER = float("inf")


class SchedulerError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServerBusy(SchedulerError):
    def __init__(self):
        super().__init__("server busy, please try again later", 503)


class NotEnoughMemory(SchedulerError):
    def __init__(self, message: str):
        super().__init__(message, 507)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(value: object) -> float:
    """Ollama's keep_alive: seconds or a Go duration ('5m', '1h30m'); negative = forever."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1 if text.startswith("-") else 1
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"invalid keep_alive duration {value!r} (use e.g. 5m, 30s, 1h, -1)") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    return FOREVER if seconds < 0 else seconds


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class Loaded:
    name: str
    record: ModelRecord
    runner: RunnerProcess
    size: int  # bytes the guard counts for it
    estimate: int
    context_length: int
    num_parallel: int
    load_id: int
    load_seconds: float
    keep_alive: float
    last_used: float = field(default_factory=time.monotonic)
    refs: int = 0
    expires_at: datetime | None = None
    expiry: asyncio.TimerHandle | None = None
    unloading: bool = False

    @property
    def pinned(self) -> bool:
        return self.keep_alive == FOREVER


class Lease:
    def __init__(self, loaded: Loaded, load_seconds: float):
        self.loaded = loaded
        self.runner = loaded.runner
        self.load_seconds = load_seconds  # time this request spent loading the model (0 if warm)


class Scheduler:
    def __init__(self, settings: Settings, store: Store, registry: Registry, node: str):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.node = node
        self.loaded: dict[str, Loaded] = {}
        self.pending = 0
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)

    # -- memory -----------------------------------------------------------------------------

    def budget(self) -> int:
        if self.settings.memory_budget is not None:
            return self.settings.memory_budget
        total = psutil.virtual_memory().total
        budget = int(total * self.settings.memory_safety)
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            budget = min(budget, int(total * 0.75))  # ~ MLX's recommended working set
        return budget

    def used(self) -> int:
        return sum(m.size for m in self.loaded.values())

    def estimate(self, rec: ModelRecord, num_ctx: int, num_parallel: int) -> int:
        d = rec.details or {}
        weights = int(d.get("weights_bytes") or rec.size)
        kv = (2 * int(d.get("num_layers") or 0) * int(d.get("kv_heads") or 0)
              * int(d.get("head_dim") or 0) * num_ctx * int(d.get("kv_dtype_bytes") or 2) * num_parallel)
        return weights + kv + RUNNER_OVERHEAD

    def _fits(self, need: int) -> bool:
        if need > self.budget() - self.used():
            return False
        if self.settings.memory_budget is None and self.settings.guard == "strict":
            # Never load into swap: what the OS can give now must cover it too.
            return need <= psutil.virtual_memory().available
        return True

    # -- leases -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, *, keep_alive: object = None, num_ctx: int | None = None):
        if self.pending >= self.settings.max_queue:
            raise ServerBusy()
        self.pending += 1
        try:
            keep = self.default_keep_alive if keep_alive is None else parse_keep_alive(keep_alive)
        except ValueError as e:
            self.pending -= 1
            raise SchedulerError(str(e), 400) from None
        try:
            loaded, load_seconds = await self._acquire(name, num_ctx)
        except BaseException:
            self.pending -= 1
            raise
        loaded.keep_alive = keep
        try:
            yield Lease(loaded, load_seconds)
        finally:
            self.pending -= 1
            await self._release(loaded)

    async def _acquire(self, name: str, num_ctx: int | None) -> tuple[Loaded, float]:
        rec = self.registry.get(name)
        if rec.missing:
            raise RegistryError(f"model '{rec.name}' has missing files; pull or create it again", 500)
        t0 = time.monotonic()
        while True:
            current = self.loaded.get(rec.name)
            if current and self._usable(current, rec, num_ctx):
                self._take(current)
                return current, 0.0
            async with self._load_lock:
                current = self.loaded.get(rec.name)
                if current and self._usable(current, rec, num_ctx):
                    self._take(current)
                    return current, 0.0
                if current:  # stale (other digest / smaller context): replace it when idle
                    if current.refs:
                        await self._wait_change(deadline=t0 + self.settings.busy_wait)
                        continue
                    await self.unload(current.name, "replaced")
                loaded = await self._load(rec, num_ctx)
                self._take(loaded)
                return loaded, time.monotonic() - t0

    def _usable(self, m: Loaded, rec: ModelRecord, num_ctx: int | None) -> bool:
        return (not m.unloading and m.runner.alive and m.record.digest == rec.digest
                and (num_ctx is None or num_ctx <= m.context_length))

    def _take(self, m: Loaded) -> None:
        m.refs += 1
        m.last_used = time.monotonic()
        if m.expiry:
            m.expiry.cancel()
            m.expiry = None
        m.expires_at = None

    async def _release(self, m: Loaded) -> None:
        m.refs -= 1
        m.last_used = time.monotonic()
        if m.refs == 0 and self.loaded.get(m.name) is m:
            self._arm_expiry(m)
        async with self._changed:
            self._changed.notify_all()

    def _arm_expiry(self, m: Loaded) -> None:
        if m.keep_alive == FOREVER:
            m.expires_at = None
            return
        m.expires_at = datetime.now(timezone.utc) + timedelta(seconds=m.keep_alive)
        loop = asyncio.get_running_loop()
        m.expiry = loop.call_later(m.keep_alive, lambda: asyncio.ensure_future(self._expire(m)))

    async def _expire(self, m: Loaded) -> None:
        if m.refs == 0 and self.loaded.get(m.name) is m:
            await self.unload(m.name, "expired")

    async def _wait_change(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SchedulerError("timed out waiting for a busy model to finish", 503)
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))

    # -- loading and unloading --------------------------------------------------------------

    async def _load(self, rec: ModelRecord, num_ctx: int | None) -> Loaded:
        model_ctx = rec.context_length or self.settings.num_ctx
        ctx = min(num_ctx or self.settings.num_ctx, model_ctx)
        parallel = self.settings.num_parallel
        need = self.estimate(rec, ctx, parallel)
        await self._make_room(rec.name, need)
        runner = RunnerProcess(
            self.registry.model_dir(rec), self.settings.run_dir,
            self.settings.logs_dir / "runners.log", num_parallel=parallel, context_length=ctx,
            python=self.settings.runner_python)
        t0 = time.monotonic()
        log.info("loading %s (estimated %s)", rec.name, fmt_bytes(need))
        ready = await runner.start(timeout=self.settings.load_timeout)
        seconds = time.monotonic() - t0
        measured = max(ready.rss_bytes, ready.mlx_active_bytes)
        load_id = self.store.start_load(rec.name, self.node, "request", max(need, measured),
                                        seconds, pid=runner.pid)
        m = Loaded(rec.name, rec, runner, size=max(need, measured), estimate=need,
                   context_length=ready.context_length, num_parallel=parallel, load_id=load_id,
                   load_seconds=seconds, keep_alive=self.default_keep_alive)
        self.loaded[rec.name] = m
        asyncio.ensure_future(self._watch(m))
        log.info("loaded %s in %.2fs (pid %s, rss %s)", rec.name, seconds, runner.pid,
                 fmt_bytes(ready.rss_bytes))
        return m

    async def _make_room(self, name: str, need: int) -> None:
        budget = self.budget()
        guard = self.settings.guard
        if need > budget and guard == "strict":
            raise NotEnoughMemory(
                f"model '{name}' needs {fmt_bytes(need)} ({need} bytes) but the memory budget is "
                f"{fmt_bytes(budget)} ({budget} bytes)")
        deadline = time.monotonic() + self.settings.busy_wait
        while not self._fits(need) or len(self.loaded) >= self.settings.max_loaded_models:
            idle = [m for m in self.loaded.values() if m.refs == 0 and not m.pinned]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                await self.unload(victim.name, "evicted")
                continue
            busy = [m for m in self.loaded.values() if not m.pinned]
            if busy and time.monotonic() < deadline:
                await self._wait_change(deadline)
                continue
            if guard != "strict":
                log.warning("memory guard (%s): loading %s without room (%s needed, %s free)",
                            guard, name, fmt_bytes(need), fmt_bytes(budget - self.used()))
                return
            pinned = [m.name for m in self.loaded.values() if m.pinned]
            free = budget - self.used()
            why = (f"; pinned by keep_alive<0: {', '.join(pinned)}" if pinned
                   else "; loaded models are busy" if busy else "")
            raise NotEnoughMemory(
                f"model '{name}' needs {fmt_bytes(need)} ({need} bytes) but only {fmt_bytes(free)} "
                f"({free} bytes) of the {fmt_bytes(budget)} budget is free{why}")

    async def unload(self, name: str, reason: str) -> bool:
        m = self.loaded.get(name)
        if m is None:
            return False
        m.unloading = True
        if m.expiry:
            m.expiry.cancel()
        del self.loaded[name]
        await m.runner.stop()
        self.store.end_load(m.load_id, reason)
        log.info("unloaded %s (%s)", name, reason)
        async with self._changed:
            self._changed.notify_all()
        return True

    async def _watch(self, m: Loaded) -> None:
        await m.runner.exited.wait()
        if m.unloading or m.runner.stopping:
            return
        log.error("runner of %s exited unexpectedly (code %s): %s", m.name, m.runner.exit_code,
                  m.runner.stderr_tail())
        if self.loaded.get(m.name) is m:
            del self.loaded[m.name]
        self.store.end_load(m.load_id, "crashed")
        async with self._changed:
            self._changed.notify_all()

    async def shutdown(self) -> None:
        for name in list(self.loaded):
            await self.unload(name, "shutdown")

    def touch(self, name: str, keep_alive: object) -> None:
        """A load-only request (empty prompt) sets the model's keep_alive like any request."""
        m = self.loaded.get(name)
        if m is not None:
            m.keep_alive = parse_keep_alive(keep_alive)
