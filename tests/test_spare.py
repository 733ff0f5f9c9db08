"""The warm spare runner, through real daemons, real runner processes and tiny random llamas.

After a load a spare runner starts; the next load hands it the model (the runner's pid is the
spare's) and another spare starts. The guard counts the spare: it never makes a load evict a
model (its memory is the next load's own), and no spare starts when the budget has no room. A
spare that outruns its start timeout is started again with twice the time. (How much faster a
warm load is: bench/hotswap.py.)
"""

from __future__ import annotations

import contextlib

import re
import time
from pathlib import Path

import psutil
import pytest

from hippod.registry.modelinfo import inspect_model_dir
from hippod.scheduler import RUNNER_OVERHEAD, kv_cache_bytes
from hippod.spare import SPARE_ESTIMATE
from tests.daemon import Daemon
from tests.modelfiles import make_tiny_llama

pytestmark = pytest.mark.slow

NUM_CTX, NUM_PARALLEL = 2048, 8
ENV = {"HIPPO_SPARE_RUNNER": "1", "HIPPO_NUM_CTX": str(NUM_CTX),
       "HIPPO_NUM_PARALLEL": str(NUM_PARALLEL)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # Enough KV per token that a model's estimate (KV for every slot, reserved ahead) is above
    # what its runner holds right after the load, so the guard counts the estimate.
    base = tmp_path_factory.mktemp("spare")
    return [make_tiny_llama(base / n, num_layers=8, hidden_size=256, intermediate_size=256,
                            num_heads=4, num_kv_heads=4, seed=i) for i, n in enumerate("ab")]


def estimate(model_dir: Path) -> int:
    info = inspect_model_dir(model_dir)
    kv = kv_cache_bytes(info.as_details(), min(NUM_CTX, info.context_length or NUM_CTX), NUM_PARALLEL)
    return info.weights_bytes + kv + min(2 * 2**30, kv) + RUNNER_OVERHEAD


def _start(home: Path, budget: int, models, **env) -> Daemon:
    d = Daemon(home, env={**ENV, "HIPPO_MEMORY_BUDGET": str(budget), **env}).start()
    for name, path in zip("ab", models):
        status, body = d.request("POST", "/api/create", {"model": name, "from": str(path),
                                                         "stream": False})
        assert status == 200, body
    return d


def load(d: Daemon, name: str) -> None:
    status, body = d.request("POST", "/api/generate", {"model": name, "prompt": ""}, timeout=300)
    assert status == 200 and body["done_reason"] == "load", body


def spare_pids(d: Daemon) -> list[int]:
    """Runner processes started as spares that hold no model (yet)."""
    _, rows = d.request("GET", "/api/hippo/loads?limit=20")
    serving = {r["pid"] for r in rows["loads"] if r["end_reason"] is None}
    pids = []
    for p in psutil.Process(d.proc.pid).children():  # runners are the daemon's direct children
        with contextlib.suppress(psutil.NoSuchProcess):  # one that exits mid-scan is not a spare
            if ("--spare" in " ".join(p.cmdline()) and p.pid not in serving
                    and p.status() != psutil.STATUS_ZOMBIE):
                pids.append(p.pid)
    return pids


def ready_spares(d: Daemon) -> list[int]:
    return [int(p) for p in re.findall(r"spare runner ready \(pid (\d+)", d.log_path.read_text())]


def wait_for(predicate, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def runner_pid(d: Daemon, name: str) -> int:
    _, rows = d.request("GET", "/api/hippo/loads?limit=5")
    return next(r["pid"] for r in rows["loads"] if r["model"].startswith(name) and r["end_reason"] is None)


def test_a_load_hands_its_model_to_the_spare(tmp_path, models):
    d = _start(tmp_path / "h", 8 * 2**30, models, HIPPO_MAX_LOADED_MODELS="1")
    try:
        assert spare_pids(d) == []  # no spare before anything was loaded
        load(d, "a")
        spare = wait_for(lambda: ready_spares(d))[-1]
        assert spare_pids(d) == [spare]
        load(d, "b")  # a swap: a is evicted, b goes into the spare's process
        assert runner_pid(d, "b") == spare
        new = wait_for(lambda: [p for p in ready_spares(d) if p != spare])
        assert spare_pids(d) == new
        status, body = d.request("POST", "/api/generate", {
            "model": "b", "prompt": "hello", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 4}})
        assert status == 200 and body["eval_count"] == 4, body
    finally:
        d.stop()
    assert not psutil.pid_exists(new[0]) or psutil.Process(new[0]).status() == psutil.STATUS_ZOMBIE


def test_the_spare_never_costs_a_model_its_place_nor_starts_without_room(tmp_path, models):
    a, b = models
    # Room for both models and less than a spare beside them: b must go into the spare's
    # process (its memory is part of b's own estimate) and a must stay loaded.
    d = _start(tmp_path / "h", estimate(a) + estimate(b) + SPARE_ESTIMATE // 2, models)
    try:
        load(d, "a")
        spare = wait_for(lambda: ready_spares(d))[-1]
        load(d, "b")
        _, ps = d.request("GET", "/api/ps")
        assert sorted(m["name"].split(":")[0] for m in ps["models"]) == ["a", "b"]
        assert runner_pid(d, "b") == spare
        time.sleep(2)  # a new spare would be spawned right after the load
        assert spare_pids(d) == []  # what is left of the budget holds no spare
        assert ready_spares(d) == [spare]
    finally:
        d.stop()


def test_a_spare_that_outruns_its_start_timeout_is_tried_again_with_twice_the_time(tmp_path, models):
    d = _start(tmp_path / "h", 8 * 2**30, models, HIPPO_SPARE_START_TIMEOUT="0.5")
    try:
        load(d, "a")
        wait_for(lambda: ready_spares(d), timeout=120)
        log = d.log_path.read_text()
        assert "spare runner did not start within 0.5 s; trying again with 1.0 s" in log
        assert "spare runner did not start: \n" not in log and "did not start: (no" not in log
        assert len(spare_pids(d)) == 1  # the runs that timed out left no process
    finally:
        d.stop()


def test_the_status_shows_the_spare_and_its_warm_up(tmp_path, models):
    d = _start(tmp_path / "h", 8 * 2**30, models, HIPPO_SPARE_WARM_BYTES="64MiB")
    try:
        _, st = d.request("GET", "/api/hippo/status")
        assert st["spare"]["state"] == "none"  # nothing loaded yet: no spare
        load(d, "a")
        st = wait_for(lambda: (s := d.request("GET", "/api/hippo/status")[1])["spare"]["state"] == "warm" and s)
        spare = st["spare"]
        assert spare["pid"] in spare_pids(d) and spare["warm_steps"] > 0
        assert spare["warm_max_bytes"] == 64 * 2**20  # the setting: the budget has far more room
        argv = psutil.Process(spare["pid"]).cmdline()
        assert argv[argv.index("--warm-max-bytes") + 1] == str(64 * 2**20)
        # Until its warm-up was done the guard counted its allowance; now its measured memory.
        assert 0 < spare["bytes"] < spare["warm_max_bytes"] + SPARE_ESTIMATE
        assert st["memory_used"] >= spare["bytes"]
    finally:
        d.stop()


def test_the_warm_up_holds_while_requests_run_and_goes_on_after(tmp_path, models):
    """A spare's warm-up shares the device with the models serving: it runs no step while a
    request holds a model, and finishes once they are idle."""
    import threading

    d = _start(tmp_path / "h", 8 * 2**30, models, HIPPO_SPARE_WARM_BYTES="64MiB",
               HIPPO_MAX_LOADED_MODELS="1")
    try:
        load(d, "a")
        first = wait_for(lambda: (s := d.request("GET", "/api/hippo/status")[1]["spare"])["state"] == "warm" and s)
        load(d, "b")  # b takes that spare; the next one starts warming while b serves
        spare = wait_for(lambda: (s := d.request("GET", "/api/hippo/status")[1]["spare"])["state"] == "warming"
                         and s["pid"] != first["pid"] and s)
        hold = max(3.0, 2 * first["warm_seconds"])  # twice what a whole warm-up took here
        stop = threading.Event()

        def serve():  # two clients back to back keep a request running the whole time
            while not stop.is_set():
                d.request("POST", "/api/generate", {"model": "b", "prompt": "hello", "raw": True,
                                                    "stream": False, "options": {"num_predict": 64}})

        clients = [threading.Thread(target=serve) for _ in range(2)]
        for c in clients:
            c.start()
        try:
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                assert d.request("GET", "/api/hippo/status")[1]["spare"]["state"] == "warming"
                time.sleep(0.2)
        finally:
            stop.set()
            for c in clients:
                c.join(60)
        done = wait_for(lambda: (s := d.request("GET", "/api/hippo/status")[1]["spare"])["state"] == "warm" and s)
        assert done["pid"] == spare["pid"] and done["warm_steps"] > 0
        log = Path(d.home / "logs" / "runners.log").read_text()
        assert re.search(rf"runner\[{spare['pid']}\] INFO spare warm-up held after \d+ steps", log), log[-2000:]
        print(f"warm-up alone {first['warm_seconds']:.2f}s, held {hold:.1f}s, then {done['warm_seconds']:.2f}s")
    finally:
        d.stop()
