"""A real hippod process on a free loopback port, for benchmarks and tests (which import it from here).

Each Daemon has its own home directory and its own log; `stop()` sends SIGTERM like launchd or
systemd would, and checks that no runner process outlives it.
"""

from __future__ import annotations

import contextlib

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, home: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 netns: str | None = None):
        self.home = Path(home)
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
        self.env.update({"HIPPO_HOME": str(self.home), "HIPPO_DISCOVERY": "false",
                         "HIPPO_KEEP_ALIVE": "10m", "PYTHONUNBUFFERED": "1",
                         # A warm spare runner costs a shared CPU an interpreter per daemon:
                         # tests and benchmarks that measure it turn it on.
                         "HIPPO_SPARE_RUNNER": "0"})
        self.env.update(env or {})
        self.args = args or []
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "test-daemon.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "Daemon":
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "hippod.daemon", "--host", self.host, "--port", str(self.port),
               *self.args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self._log = open(self.log_path, "ab")
        self._log_offset = self._log.tell()  # a restart must not see the last run's lines
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hippod exited with {self.proc.returncode}:\n{self.log()}")
            if self.netns is None and self.ping():
                self.ready_seconds = time.perf_counter() - self.started_at
                return self
            if self.netns and "listening on" in self.log()[self._log_offset:]:
                self.ready_seconds = time.perf_counter() - self.started_at
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"hippod did not answer within {timeout}s:\n{self.log()}")

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/version", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def runner_pids(self) -> list[int]:
        """The daemon's live runner processes: its direct children only (a runner's own short-lived
        forks, such as MLX's CPU JIT compiler, carry the runner's command line until they exec),
        each looked at on its own so one that exits mid-scan leaves the others counted."""
        if not self.proc:
            return []
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if (child.status() != psutil.STATUS_ZOMBIE
                        and "hippod.engine.runner" in " ".join(child.cmdline())):
                    pids.append(child.pid)
        return pids

    def admission(self) -> dict | None:
        """A loaded runner's AdmissionStats (inserts into its batch, holds), asked over its
        socket in this daemon's home (never another daemon's runner); None if none answers."""
        for path in sorted(self.home.rglob("runner-*.sock")):
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(10)
                    c.connect(str(path))
                    c.sendall(b'{"kind":"info"}\n')
                    return json.loads(c.makefile().readline()).get("admission")
            except (OSError, ValueError):
                continue
        return None

    def request(self, method: str, path: str, body=None, timeout: float = 120.0):
        """(status, parsed JSON or text) — a plain HTTP call for tests of raw behaviour."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        children = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:
            p.kill()
        self._log.close()

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
