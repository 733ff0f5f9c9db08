"""The scheduler (issue 3) against real daemons, real runner processes and tiny random llamas.

Memory pressure is forced with HIPPO_MEMORY_BUDGET, computed from the same estimate the daemon
makes (weights from the safetensors headers + KV cache + runner overhead) so that exactly one tiny
model fits. Generations are 2-4 tokens: MLX runs on a small CPU here.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ollama
import psutil
import pytest

from hippod.config import ConfigError, load_settings, parse_bytes
from hippod.registry.modelinfo import inspect_model_dir
from hippod.scheduler import FOREVER, RUNNER_OVERHEAD, kv_cache_bytes, parse_keep_alive
from tests.daemon import Daemon
from tests.modelfiles import make_tiny_llama

NUM_CTX = 512
NUM_PARALLEL = 2
SHORT = {"num_predict": 2}


# -- helpers ----------------------------------------------------------------------------------


def expected_estimate(model_dir: Path) -> int:
    info = inspect_model_dir(model_dir)
    ctx = min(NUM_CTX, info.context_length or NUM_CTX)
    kv = kv_cache_bytes(info.as_details(), ctx, NUM_PARALLEL)
    prompt_cache = min(2 * 2**30, kv)  # the runner's prompt cache, never more than the batch's KV
    return info.weights_bytes + kv + prompt_cache + RUNNER_OVERHEAD


def generate(d: Daemon, model: str, prompt: str = "hi", timeout: float = 120, **body):
    body = {"model": model, "prompt": prompt, "stream": False, "options": SHORT, **body}
    return d.request("POST", "/api/generate", body, timeout=timeout)


def ps(d: Daemon) -> dict[str, dict]:
    status, body = d.request("GET", "/api/ps")
    assert status == 200, body
    return {m["name"]: m for m in body["models"]}


def loads(d: Daemon, after: int = 0) -> list[dict]:
    status, body = d.request("GET", "/api/hippo/loads?limit=200")
    assert status == 200, body
    return sorted((r for r in body["loads"] if r["id"] > after), key=lambda r: r["id"])


def last_load_id(d: Daemon) -> int:
    rows = loads(d)
    return rows[-1]["id"] if rows else 0


def hippo_status(d: Daemon) -> dict:
    status, body = d.request("GET", "/api/hippo/status")
    assert status == 200, body
    return body


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def unload_all(d: Daemon) -> None:
    for name in ps(d):
        status, body = generate(d, name, prompt="", keep_alive=0)
        assert status == 200 and body["done_reason"] == "unload", body
    assert wait_until(lambda: not ps(d) and live_runners(d) == 0, 10), ps(d)


def ended(d: Daemon, reason: str) -> bool:
    """The latest load row is closed with `reason` (written once the runner has exited)."""
    rows = loads(d)
    return bool(rows) and rows[-1]["end_reason"] == reason


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def load_interval(row: dict) -> tuple[float, float]:
    """The store stamps started_at when a load has finished: the load ran load_seconds before."""
    end = parse_time(row["started_at"]).timestamp()
    return end - row["load_seconds"], end


def create(d: Daemon, name: str, model_dir: Path) -> None:
    status, body = d.request("POST", "/api/create", {"model": name, "from": str(model_dir),
                                                     "stream": False}, timeout=120)
    assert status == 200, body


def live_runners(d: Daemon) -> int:
    """Runner processes the daemon started: its direct children only, because a runner's own
    short-lived forks (MLX's CPU JIT runs `sh -c 'g++ --version'`) carry the runner's cmdline
    until they exec."""
    count = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(d.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):  # a zombie holds no memory any more
                if (child.status() != psutil.STATUS_ZOMBIE
                        and "hippod.engine.runner" in " ".join(child.cmdline())):
                    count += 1
    return count


class RunnerSampler:
    """Counts the daemon's runner processes every 20 ms while a scenario runs."""

    def __init__(self, d: Daemon):
        self.d = d
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.most = max(self.most, live_runners(self.d))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sched-models")
    out = {"a": make_tiny_llama(root / "a", seed=11), "b": make_tiny_llama(root / "b", seed=12)}
    # More weights than the whole budget below: 49152 x 1024 fp16 embeddings alone are 100 MB.
    out["big"] = make_tiny_llama(root / "big", seed=13, num_layers=1, hidden_size=1024,
                                 intermediate_size=256, num_heads=8, num_kv_heads=4)
    # Loads in no runner: config.json promises a third layer that the weights do not have.
    broken = make_tiny_llama(root / "broken", seed=14)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    out["broken"] = broken
    return out


@pytest.fixture(scope="module")
def budget(models) -> tuple[str, int]:
    """A HIPPO_MEMORY_BUDGET ("246.3MB"-style) that holds one tiny model but not two."""
    one = max(expected_estimate(models["a"]), expected_estimate(models["b"]))
    text = f"{one * 1.5 / 1e6:.1f}MB"
    return text, parse_bytes(text)


def daemon_env(budget_text: str, **extra) -> dict[str, str]:
    return {"HIPPO_MEMORY_BUDGET": budget_text, "HIPPO_NUM_CTX": str(NUM_CTX),
            "HIPPO_NUM_PARALLEL": str(NUM_PARALLEL), "HIPPO_BUSY_WAIT": "30", **extra}


@pytest.fixture(scope="module")
def pressured(tmp_path_factory, models, budget):
    """One daemon whose budget fits one tiny model; tests start from nothing loaded."""
    d = Daemon(tmp_path_factory.mktemp("sched-home"), env=daemon_env(budget[0])).start()
    try:
        for name in ("a", "b", "big", "broken"):
            create(d, name, models[name])
        yield d
    finally:
        d.stop()


@pytest.fixture
def d(pressured):
    unload_all(pressured)
    yield pressured
    assert pressured.proc.poll() is None, "hippod died:\n" + pressured.log()[-3000:]


# -- parsing (fast) ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    (0, 0), ("0", 0), (30, 30), (2.5, 2.5), ("1s", 1), ("5m", 300), ("1h30m", 5400),
    ("500ms", 0.5), ("1.5h", 5400), ("300", 300), (-1, FOREVER), ("-1", FOREVER),
    ("-1m", FOREVER), (-0.5, FOREVER),
])
def test_parse_keep_alive_like_ollama(value, seconds):
    assert parse_keep_alive(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "5 minutes", "1d", "m5", None, True, "nan"])
def test_parse_keep_alive_rejects(value):
    with pytest.raises(ValueError):
        parse_keep_alive(value)


@pytest.mark.parametrize("text, expected", [
    ("1.5GB", 1_500_000_000), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20),
    ("2g", 2_000_000_000), ("300mb", 300_000_000), ("1000", 1000),
])
def test_memory_budget_accepts_sizes(tmp_path, text, expected):
    settings = load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_MEMORY_BUDGET": text})
    assert settings.memory_budget == expected


def test_memory_budget_rejects_nonsense(tmp_path):
    with pytest.raises(ConfigError, match="memory_budget"):
        load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_MEMORY_BUDGET": "plenty"})


def test_prefill_batch_is_every_slot_by_default_and_refuses_a_negative(tmp_path):
    assert load_settings(environ={"HIPPO_HOME": str(tmp_path)}).prefill_batch == 0
    assert load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_PREFILL_BATCH": "8"}).prefill_batch == 8
    with pytest.raises(ConfigError, match="prefill_batch"):
        load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_PREFILL_BATCH": "-1"})


def test_estimate_reads_weights_from_headers(models):
    """Weights are the tensor bytes of the safetensors file (its size minus the header)."""
    path = models["a"] / "model.safetensors"
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    info = inspect_model_dir(models["a"])
    assert info.weights_bytes == path.stat().st_size - header
    # 2 x layers x kv_heads x head_dim x ctx x fp16 x slots
    assert kv_cache_bytes(info.as_details(), 512, 2) == 2 * 2 * 2 * 16 * 512 * 2 * 2


# -- hot-swap and the memory guard ------------------------------------------------------------


@pytest.mark.slow
def test_budget_fits_one_of_two_models(d, models, budget):
    """A, then B: A is evicted, B is served, and the loads table says why."""
    assert hippo_status(d)["memory_budget"] == budget[1]
    before = last_load_id(d)
    status, body = generate(d, "a")
    assert status == 200 and body["done"], body
    loaded = ps(d)
    assert list(loaded) == ["a:latest"]
    a = loaded["a:latest"]
    assert a["hippo"]["estimate"] == expected_estimate(models["a"])
    assert a["size"] >= a["hippo"]["estimate"]
    assert a["size_vram"] == (a["size"] if a["hippo"]["device"] == "gpu" else 0)
    assert a["context_length"] == NUM_CTX
    assert hippo_status(d)["memory_used"] <= budget[1]

    status, body = generate(d, "b")
    assert status == 200 and body["done"], body
    assert list(ps(d)) == ["b:latest"]
    assert not psutil.pid_exists(a["hippo"]["pid"])
    rows = loads(d, after=before)
    assert [(r["model"], r["reason"], r["end_reason"]) for r in rows] == [
        ("a:latest", "request", "evicted"), ("b:latest", "request", None)]
    assert all(r["load_seconds"] > 0 and r["bytes"] > 0 for r in rows)
    assert parse_time(rows[0]["ended_at"]).timestamp() <= load_interval(rows[1])[0] + 0.05


@pytest.mark.slow
def test_model_bigger_than_budget_is_refused_with_both_numbers(d, models, budget):
    need = expected_estimate(models["big"])
    assert need > budget[1]  # the precondition of this test
    assert generate(d, "b")[0] == 200
    before = last_load_id(d)
    status, body = generate(d, "big")
    assert status == 507, body
    assert str(need) in body["error"] and str(budget[1]) in body["error"], body
    # The daemon is unaffected: nothing evicted, nothing started, B still answers.
    assert list(ps(d)) == ["b:latest"] and live_runners(d) == 1
    assert loads(d, after=before) == []
    status, body = generate(d, "b")
    assert status == 200 and body["load_duration"] < 0.5e9, body


@pytest.mark.slow
def test_pinned_model_is_never_evicted(d):
    client = ollama.Client(host=d.url)
    client.generate(model="a", prompt="hi", options=SHORT, keep_alive=-1)
    (a,) = client.ps().models
    assert a.expires_at.year >= 2300  # like Ollama: now + the longest Go duration
    status, body = generate(d, "b")
    assert status == 507, body
    assert "pinned" in body["error"] and "a:latest" in body["error"], body
    assert "bytes" in body["error"]
    assert list(ps(d)) == ["a:latest"]
    # An empty prompt with keep_alive 0 unloads even a pinned model.
    r = client.generate(model="a", prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert wait_until(lambda: not ps(d), 5)
    assert wait_until(lambda: ended(d, "stopped"), 3), loads(d)[-1]


@pytest.mark.slow
def test_failed_load_is_a_clean_error(d):
    assert generate(d, "a")[0] == 200
    before = last_load_id(d)
    status, body = generate(d, "broken")
    assert status == 500, body
    assert "could not load model" in body["error"] and "layers.2" in body["error"], body
    # The broken model is not in `loaded`, left no runner and no open load row behind.
    assert "broken:latest" not in ps(d)
    assert live_runners(d) == len(ps(d))
    assert all(r["model"] != "broken:latest" for r in loads(d, after=before))
    assert all(r["ended_at"] for r in loads(d, after=before))
    status, body = generate(d, "a")
    assert status == 200, body


@pytest.mark.slow
def test_larger_context_reloads_once(d):
    """A num_ctx above the loaded one reloads the model ("replaced"); smaller ones reuse it; one
    above the model's own limit (2048 here) is clamped and does not reload again and again."""
    before = last_load_id(d)
    for num_ctx in (256, 128, 512, None, 4096, 8192, 1024):
        options = {**SHORT, **({"num_ctx": num_ctx} if num_ctx else {})}
        status, body = generate(d, "a", options=options)
        assert status == 200, body
    assert ps(d)["a:latest"]["context_length"] == 2048
    rows = loads(d, after=before)
    assert [(r["end_reason"]) for r in rows] == ["replaced", "replaced", None], rows


# -- keep_alive -------------------------------------------------------------------------------


@pytest.mark.slow
def test_keep_alive_zero_unloads_after_the_request(d):
    status, body = generate(d, "a", keep_alive=0)
    assert status == 200 and body["done"], body
    assert wait_until(lambda: not ps(d), 3), ps(d)
    assert wait_until(lambda: ended(d, "expired"), 3), loads(d)[-1]


@pytest.mark.slow
def test_keep_alive_one_second(d):
    status, body = generate(d, "a", keep_alive="1s")
    answered = time.monotonic()
    assert status == 200, body
    entry = ps(d)["a:latest"]
    left = (parse_time(entry["expires_at"]) - datetime.now(timezone.utc)).total_seconds()
    assert 0 < left <= 1.0
    assert wait_until(lambda: not ps(d), 5, interval=0.02)
    gone_after = time.monotonic() - answered
    assert 0.7 <= gone_after <= 3.0, gone_after
    assert wait_until(lambda: ended(d, "expired"), 3), loads(d)[-1]


@pytest.mark.slow
def test_later_keep_alive_replaces_earlier_and_empty_prompt_loads(d):
    client = ollama.Client(host=d.url)
    r = client.generate(model="a", prompt="", keep_alive="1h")  # empty prompt: load only
    assert r.done and r.done_reason == "load"
    expires = client.ps().models[0].expires_at
    assert abs((expires - datetime.now(timezone.utc)) - timedelta(hours=1)) < timedelta(seconds=30)
    client.generate(model="a", prompt="hi", options=SHORT, keep_alive="10m")
    expires = client.ps().models[0].expires_at
    assert abs((expires - datetime.now(timezone.utc)) - timedelta(minutes=10)) < timedelta(seconds=30)
    assert client.ps().models[0].context_length == NUM_CTX


@pytest.mark.slow
def test_stop_of_a_busy_model_waits_for_its_request(d):
    """keep_alive 0 with no prompt on a busy model unloads it after the request, never mid-way."""
    assert generate(d, "a")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "a", "prompt": "hi", "options": {"num_predict": 40}}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert not json.loads(resp.readline())["done"]  # streaming: the runner is busy
    status, body = generate(d, "a", prompt="", keep_alive=0)
    assert status == 200 and body["done_reason"] == "unload"
    lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    conn.close()
    assert lines and lines[-1].get("done") is True, lines[-3:]  # the stream finished normally
    assert wait_until(lambda: not ps(d), 5)
    assert wait_until(lambda: ended(d, "stopped"), 3), loads(d)[-1]


# -- concurrency ------------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_concurrent_requests_over_two_models(d):
    """Two models that cannot be co-resident: everyone is answered, loads never overlap, and
    the requests waiting for the same model share one load."""
    before = last_load_id(d)
    client = ollama.Client(host=d.url, timeout=180)

    def one(i: int):
        return client.generate(model="ab"[i % 2], prompt=f"count to {i}", options={"num_predict": 3})

    with RunnerSampler(d) as sampler, ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert len(answers) == 20 and all(a.done and a.eval_count > 0 for a in answers)
    assert sampler.most == 1, "two runners were alive at once"
    rows = loads(d, after=before)
    assert 2 <= len(rows) <= 4, rows  # one load per model per wave, not one per request
    intervals = sorted(load_interval(r) for r in rows)
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert end <= start + 0.05, intervals  # never two loads at once
    for earlier, later in zip(rows, rows[1:]):
        assert earlier["end_reason"] == "evicted"
        assert parse_time(earlier["ended_at"]).timestamp() <= load_interval(later)[0] + 0.05
    assert hippo_status(d)["pending_requests"] == 0
    assert all(m["hippo"]["busy"] == 0 for m in ps(d).values())


@pytest.mark.slow
def test_swap_waiting_for_a_busy_model_is_not_starved(d):
    """While B waits for busy A to drain, new requests for A queue behind B instead of keeping
    A busy (as in Ollama's one pending loop): B is served first, then A is loaded again."""
    assert generate(d, "a")[0] == 200
    before = last_load_id(d)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "a", "prompt": "hi", "options": {"num_predict": 150}}),  # ~2 s of work here
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert not json.loads(resp.readline())["done"]
    finished = {}

    def timed(key, model):
        status, body = generate(d, model, options={"num_predict": 4})
        finished[key] = (time.monotonic(), status, body)

    def queued(n: int) -> None:  # the order the requests reach the scheduler is the test's point
        assert wait_until(lambda: hippo_status(d)["pending_requests"] >= n, 20), hippo_status(d)
        time.sleep(0.1)

    with ThreadPoolExecutor(3) as pool:
        pool.submit(timed, "b", "b")
        queued(1)
        for n, key in enumerate(("a1", "a2"), start=2):
            pool.submit(timed, key, "a")
            queued(n)
    resp.read()
    conn.close()
    assert all(status == 200 for _, status, _ in finished.values()), finished
    for key in ("a1", "a2"):
        assert finished[key][0] > finished["b"][0], "a request for A overtook the swap to B"
        assert finished[key][2]["load_duration"] > 0.5e9  # it waited for A to come back
    assert [(r["model"], r["end_reason"]) for r in loads(d, after=before - 1)] == [
        ("a:latest", "evicted"), ("b:latest", "evicted"), ("a:latest", None)]


@pytest.mark.slow
def test_kill_9_of_a_runner_mid_stream(d):
    assert generate(d, "a")[0] == 200
    pid = ps(d)["a:latest"]["hippo"]["pid"]
    before = last_load_id(d) - 1
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "a", "prompt": "Tell me a long story.", "options": {"num_predict": 200}}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = json.loads(resp.readline())
    assert first["done"] is False
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    last = None
    while line := resp.readline():
        last = json.loads(line)
    ended_after = time.monotonic() - killed
    conn.close()
    assert last is not None and "error" in last and "stopped" in last["error"], last
    assert ended_after < 2.0, ended_after
    assert wait_until(lambda: "a:latest" not in ps(d), 2)
    crashed = [r for r in loads(d, after=before) if r["pid"] == pid]
    assert crashed and crashed[0]["end_reason"] == "crashed"
    status, body = generate(d, "a")
    assert status == 200 and body["done"], body
    assert ps(d)["a:latest"]["hippo"]["pid"] != pid
    assert d.proc.poll() is None


# -- queue limit and waiters that go away ------------------------------------------------------


@pytest.mark.slow
def test_excess_waiters_get_503_and_disconnects_leave_no_trace(daemon_factory, models, budget):
    d = daemon_factory("queue", env=daemon_env(budget[0], HIPPO_MAX_QUEUE="2"))
    create(d, "a", models["a"])

    def one(_):
        return generate(d, "a")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 503, 503, 503, 503], results
    assert all("server busy" in body["error"] for s, body in results if s == 503)
    assert hippo_status(d)["pending_requests"] == 0
    # Requests to a loaded model never queue: many at once all pass.
    with ThreadPoolExecutor(6) as pool:
        assert [s for s, _ in pool.map(one, range(6))] == [200] * 6

    # A client that gives up while its model loads: the load finishes and stays (for the next
    # request), no lease or pending count is left behind, no second runner appears.
    unload_all(d)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=0.3)
    conn.request("POST", "/api/generate", json.dumps({"model": "a", "prompt": "hi", "stream": False,
                                                      "options": SHORT}),
                 {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    assert wait_until(lambda: "a:latest" in ps(d) and hippo_status(d)["pending_requests"] == 0, 30)
    assert wait_until(lambda: ps(d)["a:latest"]["hippo"]["busy"] == 0, 10)
    assert live_runners(d) == 1
    status, body = generate(d, "a")
    assert status == 200 and body["load_duration"] < 0.5e9, body


@pytest.mark.slow
def test_busy_model_is_waited_for_at_most_busy_wait(daemon_factory, models, budget):
    """B needs A's room while A streams: B waits HIPPO_BUSY_WAIT, then gets a 507 naming both
    numbers; A is never cut off; once A is idle, B evicts it."""
    d = daemon_factory("busy", env=daemon_env(budget[0], HIPPO_BUSY_WAIT="1"))
    for name in ("a", "b"):
        create(d, name, models[name])
    assert generate(d, "a")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "a", "prompt": "hi", "options": {"num_predict": 250}}),  # ~3 s of work here
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert not json.loads(resp.readline())["done"]
    t0 = time.monotonic()
    status, body = generate(d, "b")
    waited = time.monotonic() - t0
    assert status == 507 and "stayed busy" in body["error"] and "bytes" in body["error"], body
    assert 0.9 <= waited < 3, waited
    lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    conn.close()
    assert lines[-1].get("done") is True and lines[-1]["eval_count"] == 250, lines[-1]
    status, body = generate(d, "b")
    assert status == 200, body
    assert list(ps(d)) == ["b:latest"] and loads(d)[-2]["end_reason"] == "evicted"


# -- guard modes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_guard_warn_and_off(daemon_factory, models, budget):
    """warn: load what does not fit, with a warning; off: no memory accounting at all."""
    warn = daemon_factory("warn", env=daemon_env(budget[0], HIPPO_GUARD="warn"))
    create(warn, "big", models["big"])
    status, body = generate(warn, "big")
    assert status == 200, body
    assert "memory guard (warn): loading big:latest without room" in warn.log()
    warn.stop()

    off = daemon_factory("off", env=daemon_env(budget[0], HIPPO_GUARD="off"))
    for name in ("a", "b"):
        create(off, name, models[name])
        assert generate(off, name)[0] == 200
    assert sorted(ps(off)) == ["a:latest", "b:latest"]  # co-resident over the budget
    assert hippo_status(off)["memory_used"] > budget[1]


# -- the scheduler in-process: cancellation paths HTTP cannot reach ----------------------------


@pytest.mark.slow
def test_cancelled_waiters_in_process(tmp_path, models, budget):
    """Cancel requests while they wait for a load (what a handler sees when its client goes
    away): the pending count comes back, the load in progress finishes and is kept, a queued load
    nobody wants any more never starts, and waiters of one model share one load."""
    from hippod.registry.registry import Registry
    from hippod.scheduler import Scheduler
    from hippod.store.database import Store

    env = {"HIPPO_HOME": str(tmp_path / "home"), **daemon_env(budget[0])}
    settings = load_settings(environ=env)
    settings.ensure_dirs()
    store = Store(settings.db_path)
    registry = Registry(settings, store)

    async def scenario():
        for name in ("a", "b"):
            await registry.create(name, str(models[name]))
        sched = Scheduler(settings, store, registry, "test")
        got = []

        async def use(name):
            async with sched.lease(name, num_ctx=NUM_CTX) as lease:
                got.append(lease.loaded)

        async def until(predicate, timeout=60):
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)

        try:
            gone = asyncio.ensure_future(use("a"))
            await until(lambda: sched.pending == 1)
            shared = [asyncio.ensure_future(use("a")) for _ in range(3)]
            unwanted = asyncio.ensure_future(use("b"))
            await until(lambda: sched.pending == 5)
            gone.cancel()
            unwanted.cancel()
            await asyncio.gather(gone, unwanted, return_exceptions=True)
            assert sched.pending == 3
            await asyncio.gather(*shared)
            assert len(got) == 3 and got[0] is got[1] is got[2]
            await until(lambda: sched._loader.done())
            assert sched.pending == 0 and list(sched.loaded) == ["a:latest"]
            a = sched.loaded["a:latest"]
            assert a.refs == 0 and a.expires_at is not None  # idle, keep_alive armed
            assert [r.model for r in store.recent_loads(10)] == ["a:latest"]  # b never loaded
            runners = [p for p in psutil.Process().children()  # not the daemons' runners
                       if "hippod.engine.runner" in " ".join(p.cmdline())]
            assert [p.pid for p in runners] == [a.runner.pid]
        finally:
            await sched.shutdown()
        assert not sched.loaded and store.open_loads() == []

    try:
        asyncio.run(scenario())
    finally:
        store.close()


# -- scheduling decisions with a stand-in runner ------------------------------------------------
# The scheduler is handed a factory (hippod.runners.RunnerFactory); these tests hand it one that
# starts StandIn runners in no time, so eviction order, refusals and queueing are checked fast.
# Every behaviour keeps its end-to-end test with real runners above.

MiB = 2**20


class StandIn:
    """Satisfies hippod.runners.Runner; generation waits until the test releases it."""

    placement = None
    end_reason = "crashed"
    outdated = False

    def __init__(self, plan, started: list):
        from hippod.protocol import ReadyEvent

        self.plan = plan
        self.ready = ReadyEvent(pid=0, load_seconds=0.0, rss_bytes=0, mlx_active_bytes=0,
                                context_length=plan.num_ctx, device="cpu")
        self.exited = asyncio.Event()
        self.exit_code = None
        self.release = asyncio.Event()
        started.append(self)

    pid = None

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def generate(self, request):
        from hippod.protocol import DoneEvent, TokenEvent

        await self.release.wait()
        yield TokenEvent("x", 1)
        yield DoneEvent("stop", 1, 1, 0.0, 0.0)

    async def embed(self, request):
        raise NotImplementedError

    async def info(self):
        raise NotImplementedError

    def memory(self) -> int:
        return 0

    def health(self) -> str:
        return "running" if self.alive else "stopped"

    async def stop(self, grace: float = 2.0) -> None:
        self.exited.set()

    async def kill(self) -> None:
        self.exited.set()


@contextlib.asynccontextmanager
async def stand_in_scheduler(tmp_path, sizes: dict[str, int], budget: int, **env):
    """A Scheduler over a real store whose models weigh `sizes` bytes, starting StandIns."""
    from hippod.registry.registry import Registry
    from hippod.runners import Runner
    from hippod.scheduler import Scheduler
    from hippod.store.database import Store
    from hippod.store.records import ModelRecord

    settings = load_settings(environ={"HIPPO_HOME": str(tmp_path / "home"), "HIPPO_MEMORY_BUDGET": str(budget),
                                      "HIPPO_KEEP_ALIVE": "10m", "HIPPO_BUSY_WAIT": "0.3", **env})
    settings.ensure_dirs()
    store = Store(settings.db_path)
    for name, size in sizes.items():
        store.put_model(ModelRecord(name=f"{name}:latest", source="dir:/x", digest=name * 8, files=[],
                                    format="mlx", size=size, details={"weights_bytes": size}))
    started: list[StandIn] = []

    async def factory(plan, on_lost):
        await asyncio.sleep(0.01)
        runner = StandIn(plan, started)
        assert isinstance(runner, Runner)  # the stand-in keeps to the interface
        return runner

    sched = Scheduler(settings, store, Registry(settings, store), "test", factory=factory)
    sched.started = started
    try:
        yield sched
    finally:
        await sched.shutdown()
        assert store.open_loads() == []
        store.close()


def overhead() -> int:
    return RUNNER_OVERHEAD


def test_stand_in_eviction_is_least_recently_used_and_never_pinned_or_busy(tmp_path):
    async def scenario():
        # Room for two 100 MiB models (each also counts the runner overhead), not three.
        async with stand_in_scheduler(tmp_path, {"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB, "d": 100 * MiB},
                                      2 * (100 * MiB + overhead()) + MiB) as sched:
            async def use(name, **kw):
                async with sched.lease(name, **kw):
                    pass

            async def hold(name):
                lease = sched.lease(name)
                await lease.__aenter__()
                return lease

            for m in sched.started:
                m.release.set()
            await use("a")
            await use("b")
            await use("a")  # b is now the least recently used
            await use("c")
            assert sorted(sched.loaded) == ["a:latest", "c:latest"]
            # A pinned model stays; the idle one goes even though it was used after.
            await use("a", keep_alive=-1)
            await use("c")
            await use("b")
            assert sorted(sched.loaded) == ["a:latest", "b:latest"]
            # Busy b and pinned a: d waits busy_wait for b, then is refused with the numbers.
            held = await hold("b")
            t0 = time.monotonic()
            with pytest.raises(Exception) as e:
                await use("d")
            assert time.monotonic() - t0 >= 0.25
            assert e.value.status == 507
            need = 100 * MiB + overhead()
            assert f"needs" in str(e.value) and f"({need} bytes)" in str(e.value) and "busy" in str(e.value)
            assert sorted(sched.loaded) == ["a:latest", "b:latest"] and sched.loaded["b:latest"].refs == 1
            await held.__aexit__(None, None, None)
            rows = sched.store.recent_loads(20)
            assert {r.model: r.end_reason for r in rows if r.end_reason} == {"b:latest": "evicted",
                                                                             "c:latest": "evicted"}

    asyncio.run(scenario())


def test_stand_in_refusal_names_both_numbers_and_loads_are_one_at_a_time(tmp_path):
    async def scenario():
        budget = 150 * MiB + overhead()
        async with stand_in_scheduler(tmp_path, {"big": 400 * MiB, "a": 100 * MiB, "b": 100 * MiB}, budget,
                                      HIPPO_BUSY_WAIT="5") as sched:
            with pytest.raises(Exception) as e:
                async with sched.lease("big"):
                    pass
            need = 400 * MiB + overhead()
            assert e.value.status == 507 and f"({need} bytes)" in str(e.value) and f"({budget} bytes)" in str(e.value)
            # Three waiters of a and one of b: a loads once, all three share it; b loads after.
            leases = [sched.lease(name) for name in "aaab"]  # held: a dropped one lets go
            tasks = [asyncio.ensure_future(lease.__aenter__()) for lease in leases]
            await asyncio.sleep(0.2)
            assert sched.pending == 1 and len(sched.started) == 1  # b queues behind busy a
            assert sched.loaded["a:latest"].refs == 3
            for m in sched.started:
                m.release.set()
            for lease in leases[:3]:
                await lease.__aexit__(None, None, None)
            await asyncio.wait_for(tasks[3], 5)
            assert [s.plan.record.name for s in sched.started] == ["a:latest", "b:latest"]
            assert list(sched.loaded) == ["b:latest"]
            await leases[3].__aexit__(None, None, None)

    asyncio.run(scenario())


def test_stand_in_share_for_a_peer_evicts_only_idle_models(tmp_path):
    async def scenario():
        size = 100 * MiB + overhead()
        async with stand_in_scheduler(tmp_path, {"a": 100 * MiB, "b": 100 * MiB}, 2 * size + MiB) as sched:
            for name in ("a", "b"):
                async with sched.lease(name):
                    pass
            busy = sched.lease("b")
            await busy.__aenter__()
            await sched.make_room_for_share("layers 0-9 of 'x'", size)  # a goes, busy b stays
            assert list(sched.loaded) == ["b:latest"]
            with pytest.raises(Exception) as e:
                await sched.make_room_for_share("layers 0-9 of 'x'", 2 * size)
            assert e.value.status == 507 and "busy or pinned" in str(e.value) and f"({2 * size} bytes)" in str(e.value)
            await busy.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_stand_in_share_for_a_peer_evicts_the_least_recently_used_and_never_a_pinned_model(tmp_path):
    async def scenario():
        size = 100 * MiB + overhead()
        sizes = {"old": 100 * MiB, "pin": 100 * MiB, "new": 100 * MiB}
        async with stand_in_scheduler(tmp_path, sizes, 3 * size + MiB) as sched:
            async with sched.lease("pin", keep_alive=-1):
                pass
            for name in ("old", "new"):
                async with sched.lease(name):
                    pass
            # "pin" was used first of all, but pinned: the least recently used idle one goes.
            await sched.make_room_for_share("layers 0-9 of 'x'", size)
            assert sorted(sched.loaded) == ["new:latest", "pin:latest"]
            await sched.make_room_for_share("layers 0-9 of 'x'", 2 * size)
            assert list(sched.loaded) == ["pin:latest"]
            with pytest.raises(Exception) as e:
                await sched.make_room_for_share("layers 0-9 of 'x'", 3 * size)
            assert e.value.status == 507 and "busy or pinned" in str(e.value)
            assert list(sched.loaded) == ["pin:latest"]

    asyncio.run(scenario())


def test_stand_in_runner_that_ends_on_its_own_is_recorded_with_its_reason(tmp_path):
    """A runner that exits while idle is gone from `loaded`, and its load row says why: a split
    that lost a node says "node lost" (SplitRunner.end_reason), a lone process "crashed"."""
    async def scenario():
        async with stand_in_scheduler(tmp_path, {"a": 10 * MiB, "b": 10 * MiB}, 500 * MiB) as sched:
            for name, reason in (("a", "node lost"), ("b", "crashed")):
                task = asyncio.ensure_future(_use(sched, name))
                while not sched.started or sched.started[-1].plan.record.name != f"{name}:latest":
                    await asyncio.sleep(0.01)
                runner = sched.started[-1]
                runner.release.set()
                await task
                runner.end_reason = reason
                runner.exited.set()  # idle: nobody holds a lease
                for _ in range(100):
                    if f"{name}:latest" not in sched.loaded:
                        break
                    await asyncio.sleep(0.01)
            assert sched.loaded == {}
            rows = sched.store.recent_loads(20)
            assert {r.model: r.end_reason for r in rows} == {"a:latest": "node lost", "b:latest": "crashed"}

    asyncio.run(scenario())


async def _use(sched, name: str) -> None:
    async with sched.lease(name):
        pass


def test_stand_in_a_draft_on_a_peer_weighs_nothing_here(tmp_path):
    """A model's draft counts in its estimate while it runs here; placed on a peer it does not
    (the peer's guard counts it), and the runner is not told to load it here either. Unpinned,
    the draft goes to a peer only when it does not fit here and the peer has room for it."""
    class DraftsOnBeta:  # what cluster.remote_drafts answers for a model pinned with --draft-on
        def __init__(self):
            self.models = set()
            self.holders = {}  # draft -> (peer, bytes it advertises free)

        def placed_on(self, model):
            return "beta" if model in self.models else None

        def peer_holding(self, draft, need):
            peer, free = self.holders.get(draft, (None, 0))
            return peer if free >= need else None

    async def scenario():
        budget = 100 * MiB + overhead() + MiB  # the target fits, not with its 60 MiB draft
        async with stand_in_scheduler(tmp_path, {"t": 100 * MiB, "d": 60 * MiB}, budget) as sched:
            rec = sched.registry.get("t")
            rec.details["draft"] = "d:latest"
            sched.store.put_model(rec)
            sched.drafts = DraftsOnBeta()
            for m in sched.started:
                m.release.set()
            with pytest.raises(Exception) as e:
                async with sched.lease("t"):
                    pass
            assert e.value.status == 507 and f"({100 * MiB + 60 * MiB + overhead()} bytes)" in str(e.value)
            # Unpinned, a peer that holds the draft with room for it takes it; one without room does not.
            sched.drafts.holders["d:latest"] = ("gamma", 60 * MiB)
            with pytest.raises(Exception):
                async with sched.lease("t"):
                    pass
            sched.drafts.holders["d:latest"] = ("gamma", 60 * MiB + overhead())
            async with sched.lease("t"):
                pass
            plan = sched.started[-1].plan
            assert plan.draft_on == "gamma" and plan.estimate == 100 * MiB + overhead()
            assert "--draft" not in plan.engine_args
            await sched.unload("t:latest", "test")
            sched.drafts.models.add("t:latest")
            async with sched.lease("t"):
                pass
            plan = sched.started[-1].plan
            assert plan.draft_on is None  # pinned: the factory reads the pin
            assert plan.estimate == 100 * MiB + overhead() and "--draft" not in plan.engine_args
            assert sched.used() == 100 * MiB + overhead()

    asyncio.run(scenario())
