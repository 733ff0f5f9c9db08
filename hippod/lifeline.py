"""Helper processes that die with the daemon, even when it is killed with SIGKILL.

`python -m hippod.lifeline PARENT_PID MODULE ARGS...` runs MODULE as `python -m MODULE ARGS...`
would, after making sure it cannot outlive process PARENT_PID:
  - on Linux the kernel sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG);
  - everywhere (macOS has no PDEATHSIG) a thread waits on stdin, a pipe only the parent holds
    open: end of file means the parent is gone, and the process kills itself.
If the parent is already gone when this starts, it exits at once. `run()` starts one and waits
for it; `command()` builds the call for other launchers, which must keep the stdin pipe open and
never write to it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import runpy
import signal
import sys
import threading
from typing import Callable

PR_SET_PDEATHSIG = 1


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "hippod.lifeline", str(os.getpid()), module, *args]


async def communicate(proc) -> tuple[bytes, bytes]:
    """(stdout, stderr) of an asyncio process started with `command()`, keeping its stdin open
    (closing it is what tells the helper to die); killed if the caller is cancelled."""
    try:
        out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
        await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    return out, err


async def run(module: str, *args: str) -> tuple[int | None, bytes, str]:
    """Run MODULE as a helper that dies with the daemon (kill -9 included) instead of writing on;
    (exit code, stdout, the last line of stderr: a failing helper's message)."""
    proc = await asyncio.create_subprocess_exec(
        *command(module, *args), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await communicate(proc)
    lines = err.decode(errors="replace").strip().splitlines()
    return proc.returncode, out, lines[-1] if lines else ""


def reply(prog: str, work: Callable[[], object], errors: tuple[type[BaseException], ...]) -> int:
    """A helper's main, the other end of `run`: work()'s result as one JSON line on stdout (exit
    0); one of the `errors` it expects as "PROG: error: MESSAGE" on stderr (exit 2)."""
    try:
        result = work()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the stdin watch below still holds
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        # os.read on the raw descriptor, not sys.stdin: a daemon thread blocked inside the
        # buffered reader makes the interpreter abort at exit (it cannot take the reader's lock).
        try:
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m hippod.lifeline PARENT_PID MODULE [ARGS...]")
    parent, module = int(argv[0]), argv[1]
    _die_with_parent(parent)
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
