"""SIGTERM while four streams run: they finish or end with an error line, nothing is orphaned,
the database is consistent, and hippod exits 0 within its grace period."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import psutil
import pytest

from hippod.store.database import Store
from tests.daemon import Daemon

GRACE = 8.0
SHORT, LONG = 100, 100_000  # tokens: one fits in the grace period, the other never does


class Stream(threading.Thread):
    """One streaming /api/generate, read line by line as a client would."""

    def __init__(self, port: int, num_predict: int):
        super().__init__(daemon=True)
        self.port, self.num_predict = port, num_predict
        self.lines: list[dict] = []
        self.started = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            body = {"model": "tiny", "prompt": "Count to a thousand:", "stream": True,
                    "options": {"num_predict": self.num_predict, "temperature": 0.8}}
            conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            for raw in resp:
                self.lines.append(json.loads(raw))
                self.started.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            self.started.set()
            conn.close()

    @property
    def ended_cleanly(self) -> bool:
        return bool(self.lines) and self.lines[-1].get("done") is True

    @property
    def ended_with_error(self) -> bool:
        return bool(self.lines) and "error" in self.lines[-1]


def refused_within(port: int, seconds: float) -> bool:
    """True once a new connection is refused (the listener closes a moment after SIGTERM)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/api/version")
            conn.getresponse().read()
        except ConnectionRefusedError:
            return True
        except (OSError, http.client.HTTPException):
            pass  # accepted as the listener closed: try again
        finally:
            conn.close()
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigterm_during_four_live_streams(tmp_path, tiny_model_dir):
    d = Daemon(tmp_path / "home", env={"HIPPO_NUM_PARALLEL": "4", "HIPPO_SHUTDOWN_GRACE": str(GRACE)}).start()
    try:
        status, body = d.request("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
        assert status == 200, body
        status, body = d.request("POST", "/api/generate", {"model": "tiny", "prompt": "warm", "stream": False,
                                                           "options": {"num_predict": 1}})
        assert status == 200, body
        runners = d.runner_pids()
        assert len(runners) == 1
        kept = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)  # a kept-alive client
        kept.request("GET", "/api/version")
        assert kept.getresponse().read()

        streams = [Stream(d.port, n) for n in (SHORT, SHORT, LONG, LONG)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(60) and s.lines, s.failure
        assert not any(s.ended_cleanly for s in streams), "a stream ended before SIGTERM"
        family = [d.proc.pid, *[c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)]]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)

        # Draining: no new connections, and kept-alive ones are told to go away.
        assert refused_within(d.port, 5.0), "hippod still took new connections 5 s after SIGTERM"
        kept.request("GET", "/api/tags")
        refused = kept.getresponse()
        assert refused.status == 503 and "shutting down" in json.loads(refused.read())["error"]

        code = d.proc.wait(GRACE + 20)
        took = time.monotonic() - t0
        assert code == 0, d.log()[-3000:]
        assert GRACE - 1 < took < GRACE + 15, took
        for s in streams:
            s.join(10)
            assert not s.is_alive() and s.failure is None, s.failure
            assert s.ended_cleanly or s.ended_with_error, s.lines[-1]
            assert all(("response" in line) or ("error" in line) for line in s.lines)
        short, long = streams[:2], streams[2:]
        assert all(s.ended_cleanly and s.lines[-1]["eval_count"] == SHORT for s in short)
        assert all(s.ended_with_error for s in long), [s.lines[-1] for s in long]
        assert "runner stopped" in long[0].lines[-1]["error"]

        time.sleep(0.5)
        alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"left running after hippod exited: {alive}"

        with Store(d.home / "hippo.db") as store:
            assert store.integrity_ok()
            assert store.open_loads() == []
            assert store.recent_loads(1)[0].end_reason == "shutdown"
            rows = [r for r in store.recent_requests(10) if r.endpoint == "/api/generate"]
        assert len(rows) == 5  # the warm-up and the four streams
        cut = [r for r in rows if r.error]
        assert len(cut) == 2 and all("runner stopped" in r.error for r in cut)
        assert sorted(r.completion_tokens for r in rows if not r.error) == [1, SHORT, SHORT]
        log = d.log()
        assert "waiting up to 8s for 4 running request(s)" in log and "stopped" in log.splitlines()[-1]
    finally:
        d.stop()


@pytest.mark.slow
def test_a_second_signal_cuts_the_grace_period_short(tmp_path, tiny_model_dir):
    d = Daemon(tmp_path / "home", env={"HIPPO_SHUTDOWN_GRACE": "120"}).start()
    try:
        status, body = d.request("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
        assert status == 200, body
        stream = Stream(d.port, LONG)
        stream.start()
        assert stream.started.wait(60) and stream.lines, stream.failure
        runners = d.runner_pids()
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert d.proc.poll() is None  # still letting the stream run
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGINT)  # the operator insists (Ctrl-C, or a second SIGTERM)
        assert d.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        stream.join(10)
        assert stream.ended_with_error, stream.lines[-1]
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in runners)
        with Store(d.home / "hippo.db") as store:
            assert store.integrity_ok() and store.open_loads() == []
    finally:
        d.stop()
