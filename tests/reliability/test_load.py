"""Load (issue 9): many concurrent clients over two models that cannot be loaded together.

Each client sends a bounded number of requests, a mix of both APIs, streamed and not, some of
them cancelled after their first token, each over its own loopback connection with a deadline.
Every request must end as one of: answered in full, refused with 503 "server busy" (the queue
limit), or cancelled by us. None may hang (a deadline is a failure), none may be lost (the audit
log holds one row per request sent), and the runners' resident memory, sampled every 50 ms,
must stay under HIPPO_MEMORY_BUDGET. CI runs 16 clients; HIPPO_RELIABILITY_FULL=1 runs 64.

tests/test_scheduler.py already proves one load at a time, shared loads and the queue limit
with a few requests; this adds scale, streaming, cancellation and the memory bound.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from hippod.config import parse_bytes
from hippod.registry.modelinfo import inspect_model_dir
from hippod.scheduler import RUNNER_OVERHEAD, kv_cache_bytes
from tests.daemon import Daemon
from tests.modelfiles import make_tiny_llama
from tests.reliability.conftest import record

NUM_CTX = 256
NUM_PARALLEL = 4
TOKENS = 6
REQUEST_DEADLINE = 240.0  # seconds: a request still open after this is hung
RETRIES = 30  # a client retries a 503 this many times, then gives up


def estimate(model_dir: Path) -> int:
    info = inspect_model_dir(model_dir)
    return info.weights_bytes + kv_cache_bytes(info.as_details(), NUM_CTX, NUM_PARALLEL) + RUNNER_OVERHEAD


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("load-models")
    return {"a": make_tiny_llama(root / "a", seed=31), "b": make_tiny_llama(root / "b", seed=32)}


@pytest.fixture(scope="module")
def budget(models) -> tuple[str, int]:
    """Holds one tiny model, not two."""
    one = max(estimate(d) for d in models.values())
    text = f"{one * 1.5 / 1e6:.1f}MB"
    assert 2 * one > parse_bytes(text)
    return text, parse_bytes(text)


@dataclass
class Outcome:
    kind: str
    model: str
    result: str  # answered | busy | cancelled | hung | failed
    seconds: float
    detail: str = ""
    request_id: int = -1


def runner_processes(d: Daemon) -> list[psutil.Process]:
    out = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(d.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "hippod.engine.runner" in " ".join(child.cmdline()):
                    out.append(child)
    return out


class MemorySampler:
    """The runners' summed RSS and their count, every 50 ms."""

    def __init__(self, d: Daemon):
        self.d = d
        self.peak_rss = 0
        self.peak_runners = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = 0
            procs = runner_processes(self.d)
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += p.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_runners = max(self.peak_runners, len(procs))
            self.samples += 1
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


KINDS = ["ollama-generate", "ollama-chat-stream", "openai-chat", "openai-chat-stream", "openai-completion-stream",
         "cancel-ollama-stream", "cancel-openai-stream"]


def request_for(kind: str, model: str, i: int) -> tuple[str, dict]:
    prompt = f"request {i}: tell me about the number {i}"
    stream = "stream" in kind
    if kind.startswith("openai-completion"):
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": TOKENS, "stream": stream}
    if "openai" in kind:
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": TOKENS, "stream": stream}
    if "chat" in kind:
        return "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                             "stream": stream, "options": {"num_predict": TOKENS}}
    return "/api/generate", {"model": model, "prompt": prompt, "stream": stream, "options": {"num_predict": TOKENS}}


def one_request(port: int, kind: str, model: str, i: int) -> Outcome:
    path, body = request_for(kind, model, i)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_DEADLINE)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 503:
            text = resp.read().decode()
            ok = "server busy" in text
            return Outcome(kind, model, "busy" if ok else "failed", time.monotonic() - t0, text[:200])
        if resp.status != 200:
            return Outcome(kind, model, "failed", time.monotonic() - t0, f"{resp.status} {resp.read()[:200]!r}")
        if kind.startswith("cancel"):
            first = resp.readline()
            while first in (b"\n", b"\r\n"):
                first = resp.readline()
            if not first:
                return Outcome(kind, model, "failed", time.monotonic() - t0, "stream ended before a first line")
            conn.sock.shutdown(socket.SHUT_RDWR)  # we go away mid-stream
            return Outcome(kind, model, "cancelled", time.monotonic() - t0)
        raw = resp.read().decode()
        seconds = time.monotonic() - t0
        if "stream" not in kind:
            answer = json.loads(raw)
            done = answer.get("done") is True or bool(answer.get("choices"))
            return Outcome(kind, model, "answered" if done else "failed", seconds, raw[-200:])
        if path.startswith("/v1/"):
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            ok = events and events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        else:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            ok = lines and lines[-1].get("done") is True and not any("error" in x for x in lines)
        return Outcome(kind, model, "answered" if ok else "failed", seconds, raw[-200:])
    except (TimeoutError, socket.timeout):
        return Outcome(kind, model, "hung", time.monotonic() - t0)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Outcome(kind, model, "failed", time.monotonic() - t0, repr(e))
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def audit_rows(d: Daemon, since: str) -> list[dict]:
    status, body = d.request("GET", f"/api/hippo/audit?limit=10000&since={since}")
    assert status == 200, body
    return body["requests"]


def run_load(tmp_path, models, budget, *, clients: int, per_client: int, max_queue: int, label: str):
    env = {"HIPPO_MEMORY_BUDGET": budget[0], "HIPPO_NUM_CTX": str(NUM_CTX), "HIPPO_NUM_PARALLEL": str(NUM_PARALLEL),
           "HIPPO_MAX_QUEUE": str(max_queue), "HIPPO_BUSY_WAIT": "120", "HIPPO_KEEP_ALIVE": "10m"}
    with Daemon(tmp_path / "home", env=env) as d:
        for name, model_dir in models.items():
            status, body = d.request("POST", "/api/create", {"model": name, "from": str(model_dir), "stream": False})
            assert status == 200, body
        rng = random.Random(9)
        plan = [[(rng.choice(KINDS), rng.choice("ab"), c * per_client + k) for k in range(per_client)]
                for c in range(clients)]
        started = time.time()
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))

        def client(jobs):
            """Like a real client: a 503 is retried after a short, jittered pause (bounded)."""
            out = []
            for kind, model, i in jobs:
                for attempt in range(RETRIES + 1):
                    outcome = one_request(d.port, kind, model, i)
                    outcome.request_id = i
                    out.append(outcome)
                    if outcome.result != "busy":
                        break
                    time.sleep(0.5 + random.random())
            return out

        with MemorySampler(d) as mem, ThreadPoolExecutor(clients) as pool:
            outcomes = [o for batch in pool.map(client, plan) for o in batch]
        wall = time.time() - started

        sent = len(outcomes)  # attempts, retries included
        by = {r: [o for o in outcomes if o.result == r] for r in ("answered", "busy", "cancelled", "hung", "failed")}
        latencies = [o.seconds for o in by["answered"]]
        final = {}  # request id -> how its last attempt ended
        for o in outcomes:
            final[o.request_id] = o.result
        given_up = sum(r == "busy" for r in final.values())
        figures = dict(clients=clients, requests=clients * per_client, attempts=sent, answered=len(by["answered"]),
                       refused_503=len(by["busy"]), gave_up_after_retries=given_up,
                       cancelled=len(by["cancelled"]), hung=len(by["hung"]), failed=len(by["failed"]),
                       wall_seconds=round(wall, 1), p50_seconds=round(percentile(latencies, 50), 3),
                       p99_seconds=round(percentile(latencies, 99), 3),
                       peak_runner_rss_mb=round(mem.peak_rss / 1e6, 1), budget_mb=round(budget[1] / 1e6, 1),
                       peak_runners=mem.peak_runners, memory_samples=mem.samples, max_queue=max_queue)
        record(label, **figures)
        print(f"\n[load] {figures}")

        assert sorted(final) == list(range(clients * per_client))  # every request has an ending
        assert not by["hung"], by["hung"][:5]
        assert not by["failed"], by["failed"][:5]
        assert by["answered"], "nothing was answered"
        assert by["busy"], "the queue limit was never reached: the 503 path went untested"
        assert mem.samples > 10 and 0 < mem.peak_rss <= budget[1], (mem.peak_rss, budget)
        assert mem.peak_runners == 1
        # Nothing lost: one audit row per request sent, the refused and the cancelled included.
        deadline = time.monotonic() + 15
        while len(rows := audit_rows(d, since)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(rows) == sent, (len(rows), sent)
        statuses = sorted({r["status"] for r in rows})
        assert set(statuses) <= {200, 499, 503}, statuses
        assert sum(r["status"] == 503 for r in rows) == len(by["busy"])
        # And nothing left behind: no waiter, no lease, the daemon answers.
        status, body = d.request("GET", "/api/hippo/status")
        assert status == 200 and body["pending_requests"] == 0, body
        status, body = d.request("GET", "/api/ps")
        assert all(m["hippo"]["busy"] == 0 for m in body["models"]), body
        status, body = d.request("POST", "/api/generate", {"model": "a", "prompt": "hi", "stream": False,
                                                          "options": {"num_predict": 2}})
        assert status == 200 and body["done"], body
        assert d.proc.poll() is None


def test_sixteen_clients(tmp_path, models, budget):
    run_load(tmp_path, models, budget, clients=16, per_client=2, max_queue=10, label="load_ci")


@pytest.mark.slow
@pytest.mark.reliability_full
def test_sixty_four_clients(tmp_path, models, budget):
    run_load(tmp_path, models, budget, clients=64, per_client=4, max_queue=16, label="load_full")
