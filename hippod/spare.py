"""One spare runner process, started ahead of need, so a load or a swap skips the cold start.

A spare has the interpreter up, MLX and mlx_lm imported and the device's common kernels run
once (on CUDA that compiles them); it waits for the daemon to name a model. Meanwhile it warms
the kernels of the models it will likely get (hippod.engine.warm: the models loaded and unloaded
last, a one-layer model of each within a memory allowance). A load takes the spare (the runner
process is the spare's, same pid), and a new spare starts in the background.

The spare is memory the guard counts (its measured RSS, an estimate while it starts, and the
warm-up allowance until its warm-up is done). None is
started unless the budget has room for it beside what is loaded. A ready spare's memory counts
toward the next load's own (the load's estimate includes its runner process, which the spare
becomes), so it never makes a load evict a model; a spare still starting is stopped before any
model is evicted for room. HIPPO_SPARE_RUNNER=0 turns it off. Its warm-up holds while requests
run (it would share the device with them) and goes on when they are done. A daemon that never loads a model
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
MAX_START_TIMEOUT = 600.0  # a start that timed out is tried again with twice the time, up to this
MIN_WARM_BYTES = 16 * 2**20  # below this a one-layer warm model is not worth starting


class SparePool:
    def __init__(self, run_dir: Path, log_path: Path, *, python: str | None, enabled: bool,
                 start_timeout: float = 120.0, warm_max_bytes: int = 0):
        self.run_dir = run_dir
        self.log_path = log_path
        self.python = python
        self.enabled = enabled
        self.start_timeout = start_timeout  # doubled after each start that ran out of it
        self.warm_max_bytes = warm_max_bytes
        self.spare: RunnerProcess | None = None  # started and warm
        self.rss = 0
        self.allowance = 0  # what the spare's warm-up model may hold, counted until it is done
        self.busy = False  # models are serving: the spare's warm-up holds until they are idle
        self._starting: asyncio.Task | None = None

    @property
    def bytes(self) -> int:
        """What the memory guard counts for the spare: measured when ready (and the warm-up
        model's allowance until the warm-up is done), estimated before."""
        if self.spare is not None and self.spare.alive:
            with contextlib.suppress(psutil.Error):
                self.rss = psutil.Process(self.spare.pid).memory_info().rss
            warming = 0 if self.spare.warmed is not None else SPARE_ESTIMATE + self.allowance
            return max(self.rss, warming, 1)
        return SPARE_ESTIMATE + self.allowance if self._starting is not None else 0

    @property
    def ready_bytes(self) -> int:
        """The ready spare's memory, which the next load takes over with its process (a warm-up
        stops, and frees its model, before the load starts)."""
        return self.bytes if self.spare is not None and self.spare.alive else 0

    @property
    def starting(self) -> bool:
        return self._starting is not None

    def status(self) -> dict:
        """For /api/hippo/status: whether a spare is there, and whether its warm-up is done."""
        spare = self.spare if self.spare is not None and self.spare.alive else None
        state = ("off" if not self.enabled else "starting" if self._starting is not None
                 else "none" if spare is None else "warm" if spare.warmed is not None else "warming")
        out = {"state": state, "bytes": self.bytes, "warm_max_bytes": self.allowance}
        if spare is not None:
            out["pid"] = spare.pid
            if spare.warmed is not None:
                out.update(warm_steps=spare.warmed.steps, warm_seconds=round(spare.warmed.seconds, 3))
        return out

    def set_busy(self, busy: bool) -> None:
        """Requests are running (or none is): a warm-up shares the device with them, so it holds
        while they run and goes on when they are done."""
        if busy == self.busy:
            return
        self.busy = busy
        if self.spare is not None and self.spare.alive and self.spare.warmed is None:
            self.spare.pause_warm_up(busy)

    def take(self) -> RunnerProcess | None:
        """The warm spare for a load to adopt, or None (then the load starts a process itself)."""
        spare, self.spare = self.spare, None
        return spare if spare is not None and spare.alive else None

    def refill(self, room: int, like: list[Path] = ()) -> None:
        """Start a new spare in the background if there is none and `room` (the guard's free
        bytes) holds one; it warms kernels for the models `like` (the likeliest first) with what
        is left of `room`, up to the warm-up allowance."""
        if not self.enabled or self._starting is not None:
            return
        if self.spare is not None and self.spare.alive:
            return
        if room < SPARE_ESTIMATE:
            return
        allowance = min(self.warm_max_bytes, room - SPARE_ESTIMATE)
        self.allowance = allowance if allowance >= MIN_WARM_BYTES and like else 0
        args = []
        if self.allowance:
            args = ["--warm-max-bytes", str(self.allowance), "--warm-like", *map(str, like)]
        self._starting = asyncio.ensure_future(self._start(args))

    async def _start(self, args: list[str]) -> None:
        try:
            while True:
                runner = RunnerProcess(None, self.run_dir, self.log_path, num_parallel=1,
                                       context_length=1, python=self.python)
                try:
                    ready = await runner.start_spare(self.start_timeout, args)
                    break
                except asyncio.TimeoutError:  # an OSError too, with an empty text
                    if self.start_timeout >= MAX_START_TIMEOUT:
                        log.warning("spare runner did not start within %.0f s; not trying again",
                                    self.start_timeout)
                        return
                    longer = min(2 * self.start_timeout, MAX_START_TIMEOUT)
                    log.warning("spare runner did not start within %.1f s; trying again with %.1f s",
                                self.start_timeout, longer)
                    self.start_timeout = longer
                except (RunnerError, OSError) as e:
                    log.warning("spare runner did not start: %s", str(e) or type(e).__name__)
                    return
        finally:
            if self._starting is asyncio.current_task():
                self._starting = None
        self.spare, self.rss = runner, ready.rss_bytes
        if self.busy:
            runner.pause_warm_up(True)
        log.info("spare runner ready (pid %s, rss %.0f MB, start %.2fs, warm-up allowance %.0f MB)",
                 ready.pid, ready.rss_bytes / 1e6, ready.warm_seconds, self.allowance / 1e6)

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
