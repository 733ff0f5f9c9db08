"""The daemon's handle on one runner process: start it, talk to it, notice its death, kill it.

Mechanics only; what to load and when to unload is the scheduler's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import psutil

from hippod.protocol import (
    DoneEvent,
    EmbedRequest,
    EmbedResult,
    ErrorEvent,
    GenerateRequest,
    InfoRequest,
    InfoResult,
    ReadyEvent,
    SpareReadyEvent,
    SpareWarmEvent,
    decode_event,
    encode,
)

log = logging.getLogger("hippo.runner")


def kernel_cache_env(cache_root: Path) -> dict[str, str]:
    """Where runner processes keep the kernels they compile, one place for all of them (and
    per MLX version): on CUDA a spare's compiled kernels are then the next runner's too."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx = version("mlx")
    except PackageNotFoundError:
        mlx = "unknown"
    root = Path(cache_root) / "kernels"
    return {"MLX_PTX_CACHE_DIR": str(root / f"mlx-{mlx}" / "ptx"), "CUDA_CACHE_PATH": str(root / "cuda")}


class RunnerError(Exception):
    """The runner failed, died, or answered with an error; `status` is the HTTP status to use."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class RunnerProcess:
    def __init__(self, model_dir: Path, run_dir: Path, log_path: Path, *, num_parallel: int,
                 context_length: int, python: str | None = None,
                 extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None):
        self.model_dir = model_dir
        # pipeline split (issue 6): --layers/--rank/--world and MLX_HOSTFILE for a shard's runner
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(extra_env or {})
        name = f"runner-{uuid.uuid4().hex[:12]}.sock"
        self.socket_path = run_dir / name
        if len(str(self.socket_path)) > 100:  # AF_UNIX paths are limited to ~104 bytes on macOS
            self.socket_path = Path(tempfile.gettempdir()) / f"hippo-{name}"
        self.log_path = log_path
        self.num_parallel = num_parallel
        self.context_length = context_length
        self.python = python or sys.executable
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: ReadyEvent | None = None
        self.exited = asyncio.Event()
        self.exit_code: int | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._watchers: list[asyncio.Task] = []
        self._conns: set[asyncio.StreamWriter] = set()
        self._numbered = 0  # generate requests numbered for this runner (see protocol.GenerateRequest)
        self.stopping = False
        self.warmed: SpareWarmEvent | None = None  # a spare whose kernel warm-up ran to the end
        self._spare_watch: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    placement = None  # one node: nothing to show beyond the model (see hippod.runners.Runner)
    end_reason = "crashed"  # a process that exits on its own crashed
    outdated = False  # set when a part it relies on is gone (its draft's peer session)

    def memory(self) -> int:
        """Its resident memory now (0 once it is gone)."""
        if not self.alive or not self.pid:
            return 0
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0

    def health(self) -> str:
        return "running" if self.alive else f"exited ({self.exit_code}): {self.stderr_tail()}"

    async def start(self, timeout: float, spare: RunnerProcess | None = None) -> ReadyEvent:
        """Spawn the runner, or hand the model to a warm `spare`, and wait for its ready line.
        Any failure, a timeout or the caller being cancelled kills the process: a load that did
        not finish leaves nothing behind."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--model", str(self.model_dir), "--socket", str(self.socket_path),
                "--num-parallel", str(self.num_parallel), "--context-length", str(self.context_length),
                *self.extra_args]
        if spare is not None and spare.alive and not self.extra_env:
            await spare._stop_watching()
            self._adopt(spare)
            self.proc.stdin.write(json.dumps({"argv": argv}).encode() + b"\n")
        else:
            if spare is not None:  # a spare cannot take another environment: do not leak it
                await spare.stop(grace=1.0)
            await self._spawn(argv)
        try:
            event = await asyncio.wait_for(self._read_ready(), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise RunnerError(f"model did not load within {timeout:.0f}s") from None
        except BaseException:
            await self.kill()
            raise
        if event is None:
            self.exit_code = await self.proc.wait()
            self.exited.set()
            await asyncio.wait(self._watchers, timeout=1.0)  # its last words on stderr
            raise RunnerError("runner exited while loading: " + self.stderr_tail())
        if isinstance(event, ErrorEvent):
            await self.kill()
            raise RunnerError(event.message)
        if not isinstance(event, ReadyEvent):
            await self.kill()
            raise RunnerError(f"runner sent {event.type!r} instead of its ready line")
        self.ready = event
        # From here on nobody reads stdout for protocol: drain it into the log, or a library
        # that prints would fill the pipe and freeze the runner.
        self._watchers.append(asyncio.ensure_future(self._pump(self.proc.stdout)))
        self._watchers.append(asyncio.ensure_future(self._watch_exit()))
        return event

    async def _spawn(self, argv: list[str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "hippod.engine.runner", *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env},
        )
        self._watchers.append(asyncio.ensure_future(self._pump(self.proc.stderr)))

    async def start_spare(self, timeout: float, args: list[str] = ()) -> SpareReadyEvent:
        """Start a runner with no model (`--spare`, warm-up `args`); `start(spare=this)` later
        names the model. Until then its stdout is read for the end of its warm-up."""
        await self._spawn(["--spare", *args])
        try:
            event = await asyncio.wait_for(self._read_ready(), timeout)
        except BaseException:
            await self.kill()
            raise
        if not isinstance(event, SpareReadyEvent):
            await self.kill()
            raise RunnerError("spare runner did not start: " + self.stderr_tail())
        self._watchers.append(asyncio.ensure_future(self._watch_exit()))
        self._spare_watch = asyncio.ensure_future(self._watch_warm())
        return event

    def pause_warm_up(self, paused: bool) -> None:
        """Tell a spare to hold its warm-up (models are serving) or go on; best effort: a spare
        that is gone has nothing to warm."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            self.proc.stdin.write(json.dumps({"pause": paused}).encode() + b"\n")

    async def _watch_warm(self) -> None:
        while True:
            event = await self._read_ready((SpareWarmEvent,))
            if event is None:
                return
            self.warmed = event

    async def _stop_watching(self) -> None:
        """Stop reading a spare's stdout, so the load that adopts it reads its ready line."""
        task, self._spare_watch = self._spare_watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _adopt(self, spare: RunnerProcess) -> None:
        """Take over the spare's process, its stderr pump and what it said so far."""
        self.proc, spare.proc = spare.proc, None
        self._watchers, spare._watchers = spare._watchers, []
        self._stderr_tail = spare._stderr_tail

    async def _read_ready(self, kinds: tuple = (ReadyEvent, SpareReadyEvent, ErrorEvent)):
        """The first protocol line of `kinds` on stdout (None at its end); other output (a
        library's print, a spare's warm-up line) goes to the log."""
        while True:
            try:
                line = await self.proc.stdout.readline()
            except ValueError:  # an over-long line that is not ours
                continue
            if not line:
                return None
            try:
                event = decode_event(line)
            except (ValueError, KeyError, TypeError):
                self._log_line(line)
                continue
            if isinstance(event, kinds):
                return event
            self._log_line(line)

    def stderr_tail(self) -> str:
        return " | ".join(self._stderr_tail) or "(no output)"

    def _log_line(self, line: bytes) -> None:
        with open(self.log_path, "ab") as f:
            f.write(line if line.endswith(b"\n") else line + b"\n")
        self._stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        with open(self.log_path, "ab") as f:
            while True:
                try:
                    line = await stream.readline()
                except (ValueError, asyncio.LimitOverrunError):  # an over-long line: skip it
                    continue
                if not line:
                    return
                f.write(line)
                f.flush()
                self._stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _watch_exit(self) -> None:
        self.exit_code = await self.proc.wait()
        self.exited.set()
        # Wake every stream at once instead of waiting for socket timeouts.
        for w in list(self._conns):
            w.close()
        self.socket_path.unlink(missing_ok=True)

    # -- jobs -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self):
        if not self.alive:
            raise RunnerError("the model's runner is not running")
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=64 * 2**20)
        except OSError as e:
            raise RunnerError(f"cannot reach the model's runner: {e}") from None
        self._conns.add(writer)
        try:
            yield reader, writer
        finally:
            self._conns.discard(writer)
            writer.close()

    def _died_message(self) -> str:
        code = self.exit_code
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the model's runner stopped ({how}) during the request"

    async def _read_event(self, reader: asyncio.StreamReader):
        try:
            line = await reader.readline()
        except (ConnectionError, OSError):
            line = b""
        if not line:
            if not self.stopping:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), 0.5)
            raise RunnerError(self._died_message() if self.exited.is_set() or self.stopping
                              else "the model's runner closed the connection")
        event = decode_event(line)
        if isinstance(event, ErrorEvent):
            raise RunnerError(event.message, event.status)
        return event

    async def generate(self, request: GenerateRequest) -> AsyncIterator[object]:
        """Yields TokenEvents then one DoneEvent. Closing the generator cancels the job.

        The request is numbered before the connection is made: requests of a burst number
        themselves while this one connects, so it goes out saying how many are right behind it."""
        self._numbered += 1
        number = self._numbered
        async with self._connection() as (reader, writer):
            writer.write(encode(replace(request, arrival=number, arrived=self._numbered)))
            await writer.drain()
            while True:
                event = await self._read_event(reader)
                yield event
                if isinstance(event, DoneEvent):
                    return

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self._call(request)

    async def info(self) -> InfoResult:
        return await self._call(InfoRequest())

    async def _call(self, request):
        async with self._connection() as (reader, writer):
            writer.write(encode(request))
            await writer.drain()
            return await self._read_event(reader)

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, grace: float = 2.0) -> None:
        """Close stdin (the runner exits by itself), then SIGKILL after `grace` seconds."""
        if self.proc is None or self.exited.is_set():
            return
        self.stopping = True
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            await self.kill()
        self.exited.set()

    async def kill(self) -> None:
        if self.proc is None:
            return
        self.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.exited.set()
        self.socket_path.unlink(missing_ok=True)
