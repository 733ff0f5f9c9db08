"""One spare runner process, started ahead of need, so a load or a swap skips the cold start.

A spare has the interpreter up, MLX and mlx_lm imported and the device's common kernels run
once (on CUDA that compiles them); it waits for the daemon to name a model. A load takes the
spare (the runner process is the spare's, same pid), and a new spare starts in the background.

The spare is memory the guard counts (its measured RSS, an estimate while it starts). None is
started unless the budget has room for it beside what is loaded. A ready spare's memory counts
toward the next load's own (the load's estimate includes its runner process, which the spare
becomes), so it never makes a load evict a model; a spare still starting is stopped before any
model is evicted for room. HIPPO_SPARE_RUNNER=0 turns it off. A daemon that never loads a model
never starts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import psutil

from hippod.runner_process import RunnerError, RunnerProcess

log = logging.getLogger("hippo.spare")
SPARE_ESTIMATE = 150 * 2**20  # an idle warm runner (about 170 MB measured on CPU), until measured
SPARE_START_TIMEOUT = 120.0


class SparePool:
    def __init__(self, run_dir: Path, log_path: Path, *, python: str | None, enabled: bool):
        self.run_dir = run_dir
        self.log_path = log_path
        self.python = python
        self.enabled = enabled
        self.spare: RunnerProcess | None = None  # started and warm
        self.rss = 0
        self._starting: asyncio.Task | None = None

    @property
    def bytes(self) -> int:
        """What the memory guard counts for the spare: measured when ready, estimated before."""
        if self.spare is not None and self.spare.alive:
            with contextlib.suppress(psutil.Error):
                self.rss = psutil.Process(self.spare.pid).memory_info().rss
            return max(self.rss, 1)
        return SPARE_ESTIMATE if self._starting is not None else 0

    @property
    def ready_bytes(self) -> int:
        """The ready spare's memory, which the next load takes over with its process."""
        return self.bytes if self.spare is not None and self.spare.alive else 0

    @property
    def starting(self) -> bool:
        return self._starting is not None

    def take(self) -> RunnerProcess | None:
        """The warm spare for a load to adopt, or None (then the load starts a process itself)."""
        spare, self.spare = self.spare, None
        return spare if spare is not None and spare.alive else None

    def refill(self, room: int) -> None:
        """Start a new spare in the background if there is none and `room` (the guard's free
        bytes) holds one."""
        if not self.enabled or self._starting is not None:
            return
        if self.spare is not None and self.spare.alive:
            return
        if room < SPARE_ESTIMATE:
            return
        self._starting = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        runner = RunnerProcess(None, self.run_dir, self.log_path, num_parallel=1, context_length=1,
                               python=self.python)
        try:
            ready = await runner.start_spare(SPARE_START_TIMEOUT)
        except (RunnerError, OSError) as e:
            log.warning("spare runner did not start: %s", str(e) or f"{type(e).__name__} after {SPARE_START_TIMEOUT:.0f} s")
            return
        finally:
            if self._starting is asyncio.current_task():
                self._starting = None
        self.spare, self.rss = runner, ready.rss_bytes
        log.info("spare runner ready (pid %s, rss %.0f MB, warm-up %.2fs)", ready.pid,
                 ready.rss_bytes / 1e6, ready.warm_seconds)

    async def discard(self, why: str = "to make room") -> bool:
        """Stop the spare (and any spare starting), e.g. to give its memory to a load; True if
        there was one."""
        dropped = False
        if self._starting is not None:
            task, self._starting = self._starting, None
            task.cancel()  # start_spare kills the process it started
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            dropped = True
        spare, self.spare = self.spare, None
        if spare is not None:
            await spare.stop(grace=1.0)
            dropped = True
        if dropped:
            log.info("spare runner stopped %s", why)
        return dropped

    async def close(self) -> None:
        await self.discard("at shutdown")
