"""Faults (issue 9): runners and daemons killed with -9, a disk that fills, a link that drops.

Already proven elsewhere, not repeated here: one Ollama stream whose runner is killed
(tests/test_scheduler.py::test_kill_9_of_a_runner_mid_stream), a peer copy whose receiving daemon
is killed (tests/test_cluster.py::test_killed_copy_resumes), a hub transfer cut by the server
(tests/test_pull.py::test_interrupted_pull_resumes) and a link dropped mid-pipeline
(tests/test_pipeline.py::test_auto_split_follows_budgets_and_survives_a_dropped_link).
Here: a runner killed under streams and waits of both APIs at once, hippod itself killed mid-pull
and restarted, a disk that is too small or fills up mid-pull, and a peer link cut mid-transfer.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.hubstub import HubStub
from tests.modelfiles import make_tiny_llama
from tests.reliability.conftest import record

MiB = 2**20


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if value := cond():
                return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting until {what}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def ndjson(text) -> list[dict]:
    if isinstance(text, dict):
        return [text]
    return [json.loads(line) for line in str(text).splitlines() if line.strip()]


def store_matches_disk(d: Daemon) -> None:
    """Every model's files are whole blobs with the right sha256 and a loadable link; no blob is
    orphaned, no temporary or partial file is left."""
    status, body = d.request("GET", "/api/tags")
    assert status == 200, body
    used = set()
    for m in body["models"]:
        status, shown = d.request("POST", "/api/show", {"model": m["name"]})
        assert status == 200, shown
        model_dir = d.home / "models" / shown["hippo"]["digest"]
        for f in shown["hippo"]["files"]:
            blob = d.home / "blobs" / f"sha256-{f['sha256']}"
            assert blob.is_file() and blob.stat().st_size == f["size"], f
            assert sha256(blob) == f["sha256"], f"corrupt blob {blob}"
            assert (model_dir / f["name"]).resolve() == blob.resolve()
            used.add(blob.name)
    on_disk = {p.name for p in (d.home / "blobs").iterdir()}
    assert on_disk == used, f"orphans or leftovers in blobs/: {sorted(on_disk - used)}"
    leftovers = [p for p in (d.home / "tmp").rglob("*") if p.is_file()]
    assert not leftovers, leftovers


# -- a runner killed while both APIs stream and wait ----------------------------------------------


def test_kill_9_of_a_runner_under_streams_and_waits_of_both_apis(tmp_path):
    model = make_tiny_llama(tmp_path / "m", seed=41)
    with Daemon(tmp_path / "home", env={"HIPPO_NUM_CTX": "2048", "HIPPO_NUM_PARALLEL": "4"}) as d:
        status, body = d.request("POST", "/api/create", {"model": "m", "from": str(model), "stream": False})
        assert status == 200, body
        assert d.request("POST", "/api/generate", {"model": "m", "prompt": "hi", "stream": False,
                                                   "options": {"num_predict": 1}})[0] == 200
        status, ps = d.request("GET", "/api/ps")
        pid = ps["models"][0]["hippo"]["pid"]
        long = 1500
        requests = [
            ("/api/generate", {"model": "m", "prompt": "a long story", "options": {"num_predict": long}}),
            ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": False,
                           "options": {"num_predict": long}}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "go"}],
                                      "max_tokens": long, "stream": True}),
            ("/v1/completions", {"model": "m", "prompt": "go", "max_tokens": long, "stream": False}),
        ]
        first_lines = threading.Barrier(3)

        def run(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            streaming = body.get("stream", True)
            if streaming:
                first = resp.readline()
                while first.strip() in (b"",):
                    first = resp.readline()
                first_lines.wait(30)
            rest = resp.read().decode()
            conn.close()
            return path, resp.status, (first.decode() if streaming else "") + rest, time.monotonic()

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(run, *r) for r in requests]
            first_lines.wait(30)  # both streams are producing tokens
            wait_until(lambda: d.request("GET", "/api/ps")[1]["models"][0]["hippo"]["busy"] == 4, 30,
                       "the two waiting requests hold their leases too")
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
        took = max(r[3] for r in results) - killed
        for path, status, text, _ in results:
            assert "Traceback" not in text and "internal error" not in text, (path, text[-300:])
            if path == "/api/generate":
                last = ndjson(text)[-1]
                assert status == 200 and "error" in last and "done" not in last, last
            elif path == "/v1/chat/completions":
                events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
                assert status == 200 and '"error"' in events[-1] and "[DONE]" not in events, events[-2:]
            else:
                assert status >= 500, (path, status, text[:300])
                err = json.loads(text)["error"]
                assert (err["message"] if path.startswith("/v1/") else err), text
        assert took < 5, took

        def killed_load() -> dict:  # closed once the scheduler has reaped the runner, maybe after the errors
            return next(r for r in d.request("GET", "/api/hippo/loads?limit=5")[1]["loads"] if r["pid"] == pid)

        wait_until(lambda: killed_load()["end_reason"] is not None, 10, "the killed runner's load closed")
        assert killed_load()["end_reason"] == "crashed"
        status, body = d.request("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
        status, body = d.request("GET", "/api/hippo/status")
        assert body["pending_requests"] == 0
        assert d.request("GET", "/api/ps")[1]["models"][0]["hippo"]["pid"] != pid
        record("faults", runner_kill9_under_4_requests=1, runner_kill9_all_ended_within_s=round(took, 2))


# -- hippod killed mid-pull, then restarted --------------------------------------------------------


class SlowHub(HubStub):
    """The hub stand-in, sending file bodies at `rate` bytes per second (so a pull can be interrupted)."""

    rate = 4 * MiB


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory) -> Path:
    """A tiny llama with a 25 MB embedding: three of the hub client's 10 MiB write chunks."""
    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "wide", hidden_size=256, seed=43)


def partial_of(d: Daemon) -> Path | None:
    found = list((d.home / "tmp" / "downloads").rglob("model.safetensors.incomplete"))
    return found[0] if found else None


def test_kill_9_of_hippod_mid_pull_then_restart(tmp_path, wide_repo):
    size = (wide_repo / "model.safetensors").stat().st_size
    assert size > 20 * MiB
    hub = SlowHub({"acme/wide": wide_repo})
    try:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        d = Daemon(tmp_path / "home", env=env).start()
        thread = threading.Thread(target=d.request, args=("POST", "/api/pull", {"model": "hf.co/acme/wide"}, 60),
                                  daemon=True)
        thread.start()
        wait_until(lambda: (p := partial_of(d)) and p.stat().st_size >= 10 * MiB, 60, "10 MiB are on disk")
        d.kill()
        cut = partial_of(d).stat().st_size
        assert 10 * MiB <= cut < size
        thread.join(10)

        d.start()  # same home: the store is reconciled with the disk
        status, tags = d.request("GET", "/api/tags")
        assert status == 200 and tags["models"] == [], tags  # no half model
        status, text = d.request("POST", "/api/pull", {"model": "hf.co/acme/wide"}, timeout=120)
        events = ndjson(text)
        assert status == 200 and events[-1] == {"status": "success"}, events[-3:]
        weights = [r for r in hub.requests if r.path.endswith("model.safetensors") and r.method == "GET"]
        assert weights[-1].range == f"bytes={cut}-", [r.range for r in weights]  # resumed, not restarted
        _, shown = d.request("POST", "/api/show", {"model": "hf.co/acme/wide"})
        files = {f["name"]: f["sha256"] for f in shown["hippo"]["files"]}
        assert files["model.safetensors"] == sha256(wide_repo / "model.safetensors")
        store_matches_disk(d)
        status, body = d.request("POST", "/api/generate", {"model": "hf.co/acme/wide", "prompt": "hi",
                                                           "stream": False, "options": {"num_predict": 2}})
        assert status == 200 and body["eval_count"] == 2, body
        d.stop()
        record("faults", hippod_kill9_mid_pull_resumed=1, resumed_at_bytes=cut)
    finally:
        hub.close()


# -- the disk: too small, or filling up mid-pull --------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
@pytest.mark.reliability_full
def test_model_bigger_than_the_disk_is_refused_before_download(tmp_path, wide_repo):
    hub = HubStub({"acme/wide": wide_repo})
    try:
        with tmpfs(tmp_path / "small", "20m") as home:
            with Daemon(home, env={"HF_ENDPOINT": hub.endpoint}) as d:
                status, body = d.request("POST", "/api/pull", {"model": "hf.co/acme/wide", "stream": False})
                assert status >= 400 and "not enough disk space" in body["error"], body
                assert "MB" in body["error"] and "needs" in body["error"]
                assert not any(r.path.startswith("/cdn/") for r in hub.requests)  # nothing downloaded
                assert d.request("GET", "/api/tags")[1]["models"] == []
                assert partial_of(d) is None
                store_matches_disk(d)
        record("faults", disk_too_small_refused=1)
    finally:
        hub.close()


@pytest.mark.slow
@pytest.mark.reliability_full
def test_disk_filling_up_mid_pull_is_a_clear_error_and_resumes_once_freed(tmp_path, wide_repo):
    small = make_tiny_llama(tmp_path / "small-model", seed=44)
    hub = SlowHub({"acme/wide": wide_repo})
    try:
        with tmpfs(tmp_path / "disk", "64m") as home:
            with Daemon(home, env={"HF_ENDPOINT": hub.endpoint}) as d:
                status, body = d.request("POST", "/api/create", {"model": "small", "from": str(small),
                                                                 "stream": False})
                assert status == 200, body
                result = {}

                def pull():
                    result["answer"] = d.request("POST", "/api/pull", {"model": "hf.co/acme/wide"}, 120)

                thread = threading.Thread(target=pull, daemon=True)
                thread.start()
                wait_until(lambda: (p := partial_of(d)) and p.stat().st_size >= 10 * MiB, 60, "10 MiB are on disk")
                ballast = home / "ballast"  # someone else takes the rest of the disk
                with open(ballast, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * MiB)
                thread.join(60)
                status, text = result["answer"]
                last = ndjson(text)[-1]
                assert "error" in last and "disk full" in last["error"], last
                assert "Traceback" not in text and "internal error" not in text
                # No partial model; the daemon still answers and reads; what must write says so.
                status, tags = d.request("GET", "/api/tags")
                assert status == 200 and [m["name"] for m in tags["models"]] == ["small:latest"], tags
                gen = {"model": "small", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
                status, body = d.request("POST", "/api/generate", gen)
                assert status == 200 or (status == 507 and "disk full" in body["error"]), body
                status, body = d.request("POST", "/api/pull", {"model": "hf.co/acme/wide", "stream": False}, 60)
                assert status == 507 and ("disk" in body["error"]), body
                assert d.ping()
                # Space comes back: the model serves, the pull resumes from what it kept and completes.
                ballast.unlink()
                status, body = d.request("POST", "/api/generate", gen)
                assert status == 200, body
                cut = partial_of(d).stat().st_size
                status, text = d.request("POST", "/api/pull", {"model": "hf.co/acme/wide"}, 120)
                assert status == 200 and ndjson(text)[-1] == {"status": "success"}, ndjson(text)[-3:]
                weights = [r for r in hub.requests if r.path.endswith("model.safetensors") and r.method == "GET"]
                assert weights[-1].range == f"bytes={cut}-"
                store_matches_disk(d)
        record("faults", disk_full_mid_pull_clear_error_then_resumed=1)
    finally:
        hub.close()


# -- a peer's link cut mid-transfer ---------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.reliability_full
def test_link_cut_mid_peer_transfer_then_resume(tmp_path):
    from hippod.cluster import trust
    from tests.netns import lan, shaped, start_in_netns
    from tests.test_cluster import Node, trusted_and_fresh
    from tests.test_cluster import wait_until as wait

    big = make_tiny_llama(tmp_path / "big", hidden_size=1024, num_layers=1, seed=45)
    secret = trust.new_secret()
    with lan(2) as net:
        a = Node(net[0], tmp_path / "alpha", "alpha", {"HIPPO_CLUSTER_SECRET": secret})
        b = Node(net[1], tmp_path / "beta", "beta", {"HIPPO_CLUSTER_SECRET": secret})
        try:
            a.start()
            b.start()
            status, body = a.call("POST", "/api/create", {"model": "big", "from": str(big), "stream": False})
            assert status == 200, body
            wait(lambda: trusted_and_fresh(b, a) and "big:latest" in b.row(a)["models"], 20, "beta sees big")
            weights = next(f for f in a.files("big") if f["name"] == "model.safetensors")
            partial = b.home / "blobs" / f".partial-{weights['sha256']}"
            with shaped(a.net.ns, a.net.ifname, "80mbit"):
                thread, result = start_in_netns(b.net.ns, b.daemon.request, "POST", "/api/hippo/pull",
                                                {"model": "big", "from": "alpha"}, 180)
                wait(lambda: partial.exists() and partial.stat().st_size > 8e6, 30, "the copy is under way",
                     interval=0.02)
                subprocess.run(["ip", "-n", b.net.ns, "link", "set", b.net.ifname, "down"], check=True)
                cut_at = time.monotonic()
                thread.join(90)
                took = time.monotonic() - cut_at
                assert not thread.is_alive(), "the pull hung after the link was cut"
                status, text = result["value"]
                last = ndjson(text)[-1]
                assert "error" in last and "alpha" in last["error"], last
                assert "Traceback" not in str(text)
                assert in_ns_tags(b) == [], "a half-copied model was recorded"
                cut = partial.stat().st_size
                assert 8e6 < cut < weights["size"]
                subprocess.run(["ip", "-n", b.net.ns, "link", "set", b.net.ifname, "up"], check=True)
            wait(lambda: trusted_and_fresh(b, a), 30, "beta trusts alpha again")
            status, text = b.call("POST", "/api/hippo/pull", {"model": "big", "from": "alpha"})
            events = ndjson(text)
            assert status == 200 and events[-1] == {"status": "success"}, events[-3:]
            assert any(e["status"].startswith("resuming model.safetensors at ") for e in events)
            blob = b.home / "blobs" / f"sha256-{weights['sha256']}"
            assert sha256(blob) == weights["sha256"] and not partial.exists()
            assert b.files("big") == a.files("big")
            record("faults", link_cut_mid_transfer_resumed=1, link_cut_error_after_s=round(took, 1))
        finally:
            a.daemon.stop()
            b.daemon.stop()


def in_ns_tags(node) -> list:
    status, body = node.call("GET", "/api/tags")
    assert status == 200, body
    return body["models"]
