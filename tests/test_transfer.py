"""Peer blob copies in parallel ranges: a real hippod serves the blob, this process copies it.

The copy splits the blob into ranges fetched over several connections at once and hashes the
file behind them; a copy cut off part way resumes every range where it stopped; a peer that
sends one corrupted range gets the whole copy refused and discarded; a peer that ignores Range
still gets copied, front to back. (Copies between two daemons on a LAN: tests/test_cluster.py.)
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import secrets
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hippod.cluster import transfer, trust
from hippod.cluster.peers import load_node_id
from hippod.cluster.transfer import TransferError, download_blob
from hippod.store.records import PeerRecord
from tests.modelfiles import make_tiny_llama

pytestmark = pytest.mark.slow
SECRET = secrets.token_hex(16)


@pytest.fixture
def small_ranges(monkeypatch):
    """Ranges and buffers small enough that a few-MB blob is cut into four pieces."""
    monkeypatch.setattr(transfer, "MIN_RANGE", 1 << 20)
    monkeypatch.setattr(transfer, "CHUNK", 128 << 10)
    monkeypatch.setattr(transfer, "SAVE_EVERY", 128 << 10)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A real hippod holding a model, and what a trusted node needs to copy from it."""
    from bench.daemon import Daemon

    root = tmp_path_factory.mktemp("transfer")
    model = make_tiny_llama(root / "m", hidden_size=256, num_layers=1, seed=3)
    d = Daemon(root / "home", env={"HIPPO_CLUSTER_SECRET": SECRET}).start()
    try:
        status, body = d.request("POST", "/api/create", {"model": "m", "from": str(model), "stream": False})
        assert status == 200, body
        _, shown = d.request("POST", "/api/show", {"model": "m"})
        blob = model / "model.safetensors"
        sha = hashlib.sha256(blob.read_bytes()).hexdigest()
        record = PeerRecord(node_id=load_node_id(d.home), name="alpha", addresses=["127.0.0.1"],
                            port=d.port, memory_total=0, memory_free=0, version="test")
        cluster = SimpleNamespace(keyring=trust.Keyring(secrets.token_hex(16), SECRET))
        yield SimpleNamespace(daemon=d, cluster=cluster, record=record, blob=blob, sha=sha,
                              size=blob.stat().st_size)
    finally:
        d.stop()


def _plan(dest: Path, sha: str) -> dict:
    return json.loads((dest.parent / f".partial-{sha}.ranges").read_text())


def test_parallel_ranges_resume_where_each_stopped(peer, tmp_path, small_ranges):
    assert peer.size > 4 * transfer.MIN_RANGE
    dest = tmp_path / f"sha256-{peer.sha}"
    cancel = threading.Event()
    seen: list[int] = []

    def cut_at_half(done: int, total: int) -> None:
        seen.append(done)
        if done >= total // 2:
            cancel.set()

    with pytest.raises(TransferError, match="cancelled") as e:
        download_blob(peer.cluster, peer.record, peer.sha, peer.size, dest, cut_at_half, cancel)
    assert e.value.status == 499
    plan = _plan(dest, peer.sha)
    ranges = plan["ranges"]
    assert len(ranges) == 4 and plan["size"] == peer.size
    # Every range moved at once: each has bytes of its own, and none is finished.
    assert sum(1 for a, b, done in ranges if done > a) >= 3, ranges
    held = sum(done - a for a, b, done in ranges)
    assert 0 < held < peer.size and transfer.partial_bytes(dest, peer.sha, peer.size) == held
    partial = dest.parent / f".partial-{peer.sha}"
    original = peer.blob.read_bytes()
    with open(partial, "rb") as f:  # what the plan says is there, is there
        for a, _, done in ranges:
            f.seek(a)
            assert f.read(done - a) == original[a:done]

    seen.clear()
    resumed = download_blob(peer.cluster, peer.record, peer.sha, peer.size, dest,
                            lambda done, total: seen.append(done), threading.Event())
    assert resumed == held, "the resumed copy fetched again what it had"
    assert min(seen) >= held and seen[-1] == peer.size
    assert dest.read_bytes() == original
    assert not partial.exists() and not (dest.parent / f".partial-{peer.sha}.ranges").exists()


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A peer that answers Range requests, optionally flipping a byte or ignoring Range."""

    data: bytes = b""
    corrupt_at: int | None = None
    honour_range = True
    slow_first = 0.0  # seconds the range at 0 waits, so the later ranges land first

    def do_GET(self):  # noqa: N802
        body, status = self.data, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start = 0
        if m and self.honour_range:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(body)
            body, status = body[start:end], 206
        if start == 0 and self.slow_first:
            time.sleep(self.slow_first)
        if self.corrupt_at is not None and start <= self.corrupt_at < start + len(body):
            i = self.corrupt_at - start
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in(peer):
    handler = type("Handler", (_StandIn,), {"data": peer.blob.read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *a: None  # a client that hangs up early is no news
    threading.Thread(target=server.serve_forever, daemon=True).start()
    record = PeerRecord(node_id="f" * 32, name="liar", addresses=["127.0.0.1"],
                        port=server.server_address[1], memory_total=0, memory_free=0, version="x")
    yield handler, record
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("where", ["first", "third, read back"])
def test_a_corrupted_range_is_refused_and_discarded(peer, stand_in, tmp_path, small_ranges, where):
    """The range at the hashed frontier is hashed from memory as it arrives; one that lands
    ahead of it (the first range is held back) is read back from disk: a flipped byte in
    either is caught."""
    handler, record = stand_in
    if where == "first":
        handler.corrupt_at = peer.size // 16
    else:
        handler.corrupt_at, handler.slow_first = peer.size * 5 // 8, 0.5
    dest = tmp_path / f"sha256-{peer.sha}"
    with pytest.raises(TransferError, match="sha256 mismatch"):
        download_blob(peer.cluster, record, peer.sha, peer.size, dest, lambda *a: None, threading.Event())
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == [], "the bad copy was kept"


def test_a_peer_that_ignores_range_is_copied_front_to_back(peer, stand_in, tmp_path, small_ranges):
    handler, record = stand_in
    handler.honour_range = False
    dest = tmp_path / f"sha256-{peer.sha}"
    assert download_blob(peer.cluster, record, peer.sha, peer.size, dest, lambda *a: None,
                         threading.Event()) == 0
    assert dest.read_bytes() == peer.blob.read_bytes()
    assert list(tmp_path.iterdir()) == [dest]


def test_ranges_that_land_out_of_order_hash_to_the_blob(peer, stand_in, tmp_path, small_ranges):
    handler, record = stand_in
    handler.slow_first = 0.5  # ranges 2-4 are on disk before range 1 starts: they are read back
    dest = tmp_path / f"sha256-{peer.sha}"
    assert download_blob(peer.cluster, record, peer.sha, peer.size, dest, lambda *a: None,
                         threading.Event()) == 0
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == peer.sha
    assert list(tmp_path.iterdir()) == [dest]


def test_one_stream_per_blob_resumes_and_verifies(peer, tmp_path, small_ranges):
    """A pull with many large blobs gives each one connection (parts=1): cut off, it keeps a
    one-range plan and resumes from where it stopped."""
    dest = tmp_path / f"sha256-{peer.sha}"
    cancel = threading.Event()

    def cut_at_half(done: int, total: int) -> None:
        if done >= total // 2:
            cancel.set()

    with pytest.raises(TransferError, match="cancelled"):
        download_blob(peer.cluster, peer.record, peer.sha, peer.size, dest, cut_at_half, cancel, parts=1)
    (start, end, held), = _plan(dest, peer.sha)["ranges"]
    assert (start, end) == (0, peer.size) and 0 < held < peer.size
    assert download_blob(peer.cluster, peer.record, peer.sha, peer.size, dest, lambda *a: None,
                         threading.Event(), parts=1) == held
    assert dest.read_bytes() == peer.blob.read_bytes()
