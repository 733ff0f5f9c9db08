"""The outside probe: eight holes an attacker found, each tried again against a real hippod.

1. a cluster peer names a digest that is a path (split/prepare) -> 400, nothing written outside
2. an imported directory holds links out of it -> refused by name; a hub cache still imports;
   blobs are 0600
3. big bodies with a bogus peer signature -> 403/413 unread, RSS stays flat
4. a DNS-rebinding page (foreign Host) -> 403; loopback names and HIPPO_ALLOWED_HOSTS pass
5. a signed request replayed after a restart -> 403
6. kill -9 during a GGUF create -> the converter dies with the daemon; tmp/ is clean after restart
7. kill -9 during a directory create -> after restart no orphan blob, dir or temp file
8. a non-UTF-8 Authorization header -> 401, never a 500 or exception text
Also: non-ASCII model names, the `from` error seen from another machine, the Host check on a
LAN address, and mDNS announcements naming addresses off our subnet (network namespaces).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from hippod import lifeline
from hippod.cluster import trust
from hippod.cluster.peers import NodeInfo
from tests.daemon import REPO_ROOT, Daemon
from tests.modelfiles import make_tiny_llama
from tests.reliability.conftest import record
from tests.reliability.test_faults import store_matches_disk
from tests.reliability.wire import request_bytes, send, send_raw
from tests.test_auth import KEY, KeyedDaemon
from tests.test_cluster import wait_until

SECRET = trust.new_secret()
FAKE_ID = "f" * 32
MiB = 1 << 20


def node_id(d: Daemon) -> str:
    return (d.home / "node-id").read_text().strip()


def signed_send(d: Daemon, ring: trust.Keyring, method: str, path: str, body: bytes = b"", **kw):
    headers = {**ring.sign(method, path, body, node_id(d)), **kw.pop("headers", {})}
    return send(d.port, method, path, body or None, headers=headers, **kw)


@pytest.fixture(scope="module")
def peerd(tmp_path_factory):
    """A node of a cluster, API key on: what a cluster member and a LAN stranger talk to."""
    root = tmp_path_factory.mktemp("probe-peer")
    with KeyedDaemon(root / "home", env={"HIPPO_CLUSTER_SECRET": SECRET, "HIPPO_MEMORY_BUDGET": "4GB"}) as d:
        yield d


# -- 1. a peer's digest is never a path ------------------------------------------------------


class FakeCoordinator:
    """A cluster member (it holds the secret) that serves a manifest whose digest is a path."""

    def __init__(self, digest: str):
        self.ring = trust.Keyring(FAKE_ID, SECRET)
        self.payload = json.dumps({"model_type": "llama"}).encode()
        sha = hashlib.sha256(self.payload).hexdigest()
        self.manifest = {"name": "evil:latest", "digest": digest, "format": "mlx", "source": "x", "size": 1,
                         "details": {}, "files": [{"name": "config.json", "sha256": sha, "size": len(self.payload)}]}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                sig = fake.ring.sign_response(self.headers.get(trust.H_NONCE, ""), status, body)
                self.send_header(trust.H_SIGNATURE, sig)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(200, fake.info().to_json())

            def do_GET(self):
                if self.path.startswith("/api/hippo/peer/manifest"):
                    self.answer(200, json.dumps(fake.manifest).encode())
                else:
                    self.answer(200, fake.payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def info(self) -> NodeInfo:
        return NodeInfo(node_id=FAKE_ID, name="mallory", version="0", port=self.port, addresses=["127.0.0.1"])

    def close(self):
        self.server.shutdown()


def test_a_peer_cannot_make_a_node_write_outside_its_home(peerd, tmp_path):
    escape = peerd.home.parent / "escaped"
    fake = FakeCoordinator("../../escaped")
    try:
        assert signed_send(peerd, fake.ring, "POST", "/api/hippo/peer/hello", fake.info().to_json()).status == 200
        bad = {"digest": ["../../escaped", str(tmp_path / "abs"), "/etc", "A" * 64, "0" * 63, "0" * 64 + "/.."],
               "split": ["../../x", "a/b", "", "x" * 65, "..\x00"]}
        refused = 0
        for key, values in bad.items():
            for value in values:
                fake.manifest["digest"] = value if key == "digest" else "0" * 64
                body = {"split": "s1", "model": "evil", "digest": "0" * 64, "layers": [0, 1], "rank": 1,
                        "world": 2, "bytes": 1, key: value}
                answer = signed_send(peerd, fake.ring, "POST", "/api/hippo/peer/split/prepare",
                                     json.dumps(body).encode())
                assert answer.status == 400 and key in answer.json()["error"], (key, value, answer.text)
                refused += 1
        assert not escape.exists() and not (tmp_path / "abs").exists()
        assert not (peerd.home / "shards").exists() or not any((peerd.home / "shards").iterdir())
        record("probe", peer_path_digests_refused=refused)
    finally:
        fake.close()


# -- 2. links out of an imported directory ------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-plain")
    with Daemon(root / "home", env={"HIPPO_ALLOWED_HOSTS": "hippo.example"}) as d:
        yield d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("probe-tiny") / "tiny", seed=61)


def _copy_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_import_follows_links_only_inside_the_tree_or_a_hub_cache(plain, tiny, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow.txt").write_text("root:$6$secret\n")
    os.chmod(secret / "shadow.txt", 0o640)
    (secret / "config.json").write_bytes((tiny / "config.json").read_bytes())
    refused = []
    for link, target in (("x.json", Path("/etc/passwd")), ("y.txt", secret / "shadow.txt"),
                         ("sub/z.json", secret / "shadow.txt"), ("config.json", secret / "config.json")):
        model = _copy_tree(tiny, tmp_path / f"m-{len(refused)}")
        (model / link).parent.mkdir(exist_ok=True)
        (model / link).unlink(missing_ok=True)
        (model / link).symlink_to(target)
        status, body = plain.request("POST", "/api/create", {"model": "linky", "from": str(model), "stream": False})
        assert status == 400 and link in body["error"] and "link" in body["error"], body
        refused.append(link)
    model = _copy_tree(tiny, tmp_path / "m-dir")
    (model / "other").symlink_to(secret, target_is_directory=True)
    status, body = plain.request("POST", "/api/create", {"model": "linky", "from": str(model), "stream": False})
    assert status == 400 and "other" in body["error"], body
    assert plain.request("POST", "/api/show", {"model": "linky"})[0] == 404
    assert "$6$secret" not in "".join(p.read_text(errors="replace") for p in (plain.home / "blobs").glob("sha256-*")
                                      if p.stat().st_size < 10_000)

    # A Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; a link inside the tree too.
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (snap / "generation_config_copy.json").symlink_to("config.json")  # inside the tree
    status, body = plain.request("POST", "/api/create", {"model": "tinyk", "from": str(snap), "stream": False})
    assert status == 200, body
    status, shown = plain.request("POST", "/api/show", {"model": "tinyk"})
    assert status == 200 and "generation_config_copy.json" in {f["name"] for f in shown["hippo"]["files"]}
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in (plain.home / "blobs").glob("sha256-*")}
    assert modes == {oct(0o600)}, modes
    record("probe", links_out_refused=len(refused) + 1, hub_cache_import="ok", blob_modes=sorted(modes))


def test_model_names_are_ascii_only(plain, tiny):
    """'tinyK' with U+212A KELVIN SIGN must not fold to the model 'tinyk'."""
    if plain.request("POST", "/api/show", {"model": "tinyk"})[0] != 200:
        status, body = plain.request("POST", "/api/create", {"model": "tinyk", "from": str(tiny), "stream": False})
        assert status == 200, body
    for name in ("tiny\u212a", "t\u0131nyk", "tinyk\uff1alatest"):
        status, body = plain.request("POST", "/api/show", {"model": name})
        assert status == 400 and "ASCII" in body["error"], (name, status, body)


# -- 3. bodies before authentication ----------------------------------------------------------


def _push(port: int, path: str, size: int, headers: dict, out: list) -> None:
    """Send the headers of a `size` byte body; note (status, answered before any body byte).
    If no answer comes within a second, send the body and wait for one."""
    head = request_bytes("POST", path.encode(), b"", {**headers, "Content-Length": str(size)})
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(head)
        early = True
        try:
            data = s.recv(4096)
        except socket.timeout:
            early, chunk = False, b"x" * MiB
            s.settimeout(60)
            try:
                for _ in range(size // MiB):
                    s.sendall(chunk)
                data = s.recv(4096)
            except OSError:
                data = b""
        try:
            out.append((int(data.split()[1]), early))
        except (IndexError, ValueError):
            out.append((0, early))


def test_bodies_are_not_read_before_the_signature_headers_check(peerd):
    proc = psutil.Process(peerd.proc.pid)
    before = proc.memory_info().rss
    member = trust.Keyring(FAKE_ID, SECRET)
    fresh = member.sign("POST", "/api/hippo/peer/hello", b"", node_id(peerd))
    variants = [{trust.H_SIGNATURE: "bogus"},  # what the probe sent
                {**fresh, trust.H_TIME: str(int(time.time()) - 3600)},  # stale
                {**fresh, trust.H_TO: "0" * 32},  # for another node
                None]  # a member's own headers (each its own nonce), body far too big
    paths = ["/api/hippo/peer/hello", "/api/hippo/peer/split/prepare"] * 8
    statuses: list[int] = []
    threads = [threading.Thread(target=_push, args=(
        peerd.port, path, 30 * MiB, variants[i % 4] or member.sign("POST", path, b"", node_id(peerd)), statuses))
        for i, path in enumerate(paths)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    seconds = time.monotonic() - t0
    grown = (proc.memory_info().rss - before) / MiB
    assert statuses == [(403 if i % 4 < 3 else 413, True) for i in range(16)] or \
        sorted(statuses) == sorted((403 if i % 4 < 3 else 413, True) for i in range(16)), statuses
    assert grown < 40, f"RSS grew by {grown:.0f} MiB for 16 refused 30 MiB bodies"
    # A real member still gets in.
    info = NodeInfo(node_id=FAKE_ID, name="m", version="0", port=1).to_json()
    assert signed_send(peerd, trust.Keyring(FAKE_ID, SECRET), "POST", "/api/hippo/peer/hello", info).status == 200
    record("probe", refused_big_bodies=len(statuses), rss_growth_mib=round(grown, 1),
           refused_in_seconds=round(seconds, 2))


def test_a_stranger_who_never_sends_the_body_holds_no_reading_slot(peerd):
    """The cheap headers (our public node id, the time) are all a LAN stranger can get right. A
    flood of those that declare a body and never send it is refused unread, so a member's
    hello that comes behind it is answered at once, not after the slots' wait."""
    from hippod.api.peer import PEER_READS, PEER_SLOT_WAIT

    forged = {trust.H_NODE: "s" * 32, trust.H_TO: node_id(peerd), trust.H_TIME: f"{time.time():.3f}",
              trust.H_NONCE: "n" * 32, trust.H_SIGNATURE: "0" * 64, trust.H_BODY: "0" * 64}
    held, answers = [], []
    try:
        for _ in range(PEER_READS + 4):
            s = socket.create_connection(("127.0.0.1", peerd.port), timeout=5)
            s.sendall(request_bytes("POST", b"/api/hippo/peer/hello", b"",
                                    {**forged, "Content-Length": str(MiB)}))
            held.append(s)
        for s in held:  # each is answered before any body byte was sent
            answers.append(int(s.recv(4096).split()[1]))
        info = NodeInfo(node_id=FAKE_ID, name="m", version="0", port=1).to_json()
        answer = signed_send(peerd, trust.Keyring(FAKE_ID, SECRET), "POST", "/api/hippo/peer/hello", info,
                             timeout=PEER_SLOT_WAIT + 5)
    finally:
        for s in held:
            s.close()
    assert answers == [403] * len(held)
    assert answer.status == 200 and answer.seconds < PEER_SLOT_WAIT / 2, (answer.status, answer.seconds)


def test_a_body_altered_on_the_way_is_refused(peerd):
    """Headers signed over one body, another body sent: 403, and the member's next request,
    signed afresh, still gets in."""
    ring = trust.Keyring(FAKE_ID, SECRET)
    info = NodeInfo(node_id=FAKE_ID, name="m", version="0", port=1).to_json()
    other = NodeInfo(node_id=FAKE_ID, name="evil", version="0", port=2).to_json()
    headers = ring.sign("POST", "/api/hippo/peer/hello", info, node_id(peerd))
    altered = send(peerd.port, "POST", "/api/hippo/peer/hello", other, headers=headers)
    assert altered.status == 403 and b"does not match its signed hash" in altered.body, altered
    assert signed_send(peerd, ring, "POST", "/api/hippo/peer/hello", info).status == 200


def test_a_forged_announcement_of_a_trusted_peer_redirects_nothing(peerd, tmp_path):
    """mDNS is unauthenticated. A stranger who announces a trusted peer's id with its own
    address and port, and answers hellos there unsigned, must not move where signed traffic
    goes, rename the peer, demote it, or keep it stale with forged goodbyes."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from hippod.cluster import peers as peers_mod
    from hippod.cluster.discovery import Announcement
    from hippod.cluster.peers import Cluster
    from hippod.config import load_settings
    from hippod.registry.registry import Registry
    from hippod.scheduler import Scheduler
    from hippod.store.database import Store

    settings = load_settings({"home": str(tmp_path / "alpha"), "cluster_secret": SECRET}, environ={})
    settings.ensure_dirs()
    beta = node_id(peerd)

    async def impostor(request: web.Request) -> web.Response:  # no secret: an unsigned answer
        return web.json_response({"node_id": beta, "name": "evil", "version": "0", "port": 1})

    async def run() -> None:
        app = web.Application()
        app.router.add_post(peers_mod.HELLO_PATH, impostor)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.2", 0)
        await site.start()
        evil_port = site._server.sockets[0].getsockname()[1]
        with Store(settings.db_path) as store:
            registry = Registry(settings, store)
            alpha = Cluster(settings, store, registry, Scheduler(settings, store, registry, "alpha"), "alpha")
            alpha.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            try:
                table = alpha.peers
                table.seen(Announcement(beta, "beta", "0", ("127.0.0.1",), peerd.port))
                assert await alpha.probe(table.store.get_peer(beta))
                signed_name = table.store.get_peer(beta).name  # what its signed hello says
                table.seen(Announcement(beta, "evil", "0", ("127.0.0.2",), evil_port))
                rec = table.store.get_peer(beta)
                assert (rec.name, rec.port, rec.addresses, rec.trusted) == (signed_name, peerd.port, ["127.0.0.1"], True)
                assert table.candidates[beta] == ["127.0.0.2"]
                # The impostor answers where the peer does not: nothing changes.
                await alpha.probe(replace(rec, addresses=["127.0.0.2"], port=evil_port))
                table.heard(beta, trusted=False, address="127.0.0.2")
                rec = table.store.get_peer(beta)
                assert (rec.addresses, rec.trusted) == (["127.0.0.1"], True)
                assert table.probe_addresses(rec) == ["127.0.0.1", "127.0.0.2"]
                # Forged goodbyes: the first makes it stale; once it answered signed past the
                # grace, its goodbyes are doubted and its probes decide.
                table.said_goodbye(beta)
                assert table.is_stale(table.store.get_peer(beta))
                table.gone[beta] -= peers_mod.GOODBYE_GRACE + 1  # as if the grace has passed
                assert await alpha.probe(table.store.get_peer(beta))
                table.said_goodbye(beta)
                assert not table.is_stale(table.store.get_peer(beta))
            finally:
                await alpha.session.close()
                await runner.cleanup()

    asyncio.run(run())


# -- 4. DNS rebinding ---------------------------------------------------------------------------


def test_a_foreign_host_header_is_refused(plain):
    routes = ["/api/tags", "/api/ps", "/api/hippo/audit", "/api/hippo/nodes", "/metrics", "/v1/models", "/",
              "/api/version"]
    refused = 0
    for path in routes:
        for host in ("evil.example", f"evil.example:{plain.port}", "localhost.evil.example", "127.0.0.1.nip.io",
                     "hippo.example.evil", "user@localhost"):
            answer = send_raw(plain.port, request_bytes("GET", path.encode(), headers={"Host": host}))
            assert answer.status == 403, (path, host, answer.status)
            assert "HIPPO_ALLOWED_HOSTS" in answer.text
            refused += 1
        for host in ("localhost", f"localhost:{plain.port}", f"127.0.0.1:{plain.port}", f"[::1]:{plain.port}",
                     "LOCALHOST", "hippo.example", f"hippo.example:{plain.port}"):
            answer = send_raw(plain.port, request_bytes("GET", path.encode(), headers={"Host": host}))
            assert answer.status == 200, (path, host, answer.status, answer.text[:200])
    error = json.loads(send_raw(plain.port, request_bytes("GET", b"/v1/models", headers={"Host": "evil"})).body)
    assert error["error"]["type"] == "permission_error"
    record("probe", rebinding_hosts_refused=refused)


# -- 5. replay after a restart --------------------------------------------------------------------


def test_no_web_page_can_manage_the_cluster_secret(plain):
    """A page on localhost passes the CORS check (Ollama's default origins), so a call to
    init or join that carries an Origin is refused: no page may read or set the join token."""
    for path in ("/api/hippo/cluster/init", "/api/hippo/cluster/join"):
        answer = send(plain.port, "POST", path, b"{}", headers={"Origin": "http://localhost:3000"})
        assert answer.status == 403 and "hippoctl" in answer.text, (path, answer)
    assert not (plain.home / trust.KEY_FILE).exists()


def test_a_signed_request_replayed_after_a_restart_is_refused(tmp_path):
    d = Daemon(tmp_path / "home", env={"HIPPO_CLUSTER_SECRET": SECRET}).start()
    try:
        ring = trust.Keyring(FAKE_ID, SECRET)
        body = NodeInfo(node_id=FAKE_ID, name="m", version="0", port=1).to_json()
        headers = ring.sign("POST", "/api/hippo/peer/hello", body, node_id(d))
        assert send(d.port, "POST", "/api/hippo/peer/hello", body, headers=headers).status == 200
        again = send(d.port, "POST", "/api/hippo/peer/hello", body, headers=headers)
        assert again.status == 403 and "replay" in again.text
        d.stop()
        d.start()
        after = send(d.port, "POST", "/api/hippo/peer/hello", body, headers=headers)
        assert after.status == 403 and "before this node started" in after.text, after.text
        assert signed_send(d, ring, "POST", "/api/hippo/peer/hello", body).status == 200  # fresh ones pass
        record("probe", replay_after_restart=after.status)
    finally:
        d.stop()


# -- 6. kill -9 during a GGUF create --------------------------------------------------------------


def _children(pid: int, marker: str) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if marker in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _in_background(d: Daemon, create: dict) -> None:
    """A create the test will cut off by killing the daemon (so its connection just breaks)."""
    def go():
        try:
            d.request("POST", "/api/create", create, 120)
        except OSError:
            pass
    threading.Thread(target=go, daemon=True).start()


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_9_during_a_gguf_create_takes_the_converter_with_it(tmp_path, smol_gguf):
    d = Daemon(tmp_path / "home").start()
    _in_background(d, {"model": "smol", "from": str(smol_gguf), "stream": False})
    wait_until(lambda: _children(d.proc.pid, "hippod.engine.gguf"), 30, "the converter runs", interval=0.02)
    converter = _children(d.proc.pid, "hippod.engine.gguf")[0]
    time.sleep(1.0)  # well into the conversion (it takes seconds)
    assert converter.is_running() and not _dead(converter)
    d.kill()
    t0 = time.monotonic()
    wait_until(lambda: _dead(converter), 5, "the converter is gone", interval=0.01)  # a zombie counts
    died_after = time.monotonic() - t0
    assert died_after < 1.0, f"the converter outlived hippod by {died_after:.2f}s"
    d.start()
    try:
        assert not any((d.home / "tmp").rglob("*")), list((d.home / "tmp").rglob("*"))
        store_matches_disk(d)
        record("probe", converter_outlived_kill_seconds=round(died_after, 3))
    finally:
        d.stop()


def test_a_helper_on_a_lifeline_exits_cleanly_when_done():
    """The stdin watch must not make a helper that finishes abort at exit (a daemon thread
    blocked in sys.stdin's reader does); whole GGUF imports are the shared `hippod` fixture's."""
    proc = subprocess.Popen(lifeline.command("platform"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO_ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(30) == 0 and out.strip(), (proc.returncode, err[-500:])
    proc.stdin.close()


# -- 7. kill -9 during a directory create -------------------------------------------------------


def test_kill_9_during_a_directory_create_leaves_no_orphans(tmp_path, tiny):
    model = _copy_tree(tiny, tmp_path / "big")
    noise = os.urandom(MiB)
    for i in range(40):  # many files, so the kill lands between two of them
        (model / f"notes-{i:02d}.txt").write_bytes(noise[i:] + noise[:i])
    d = Daemon(tmp_path / "home").start()
    try:
        status, body = d.request("POST", "/api/create", {"model": "keep", "from": str(tiny), "stream": False})
        assert status == 200, body
        kept = {p.name for p in (d.home / "blobs").iterdir()}
        _in_background(d, {"model": "big", "from": str(model), "stream": False})
        wait_until(lambda: len(list((d.home / "blobs").iterdir())) >= len(kept) + 5, 30, "blobs are written",
                   interval=0.01)
        d.kill()
        orphans = len({p.name for p in (d.home / "blobs").iterdir()} - kept)
        assert orphans >= 5
        d.start()
        store_matches_disk(d)
        assert {m["name"] for m in d.request("GET", "/api/tags")[1]["models"]} == {"keep:latest"}
        assert {p.name for p in (d.home / "blobs").iterdir()} == kept
        status, body = d.request("POST", "/api/create", {"model": "big", "from": str(model), "stream": False})
        assert status == 200, body
        store_matches_disk(d)
        record("probe", orphans_before_restart=orphans, orphans_after_restart=0)
    finally:
        d.stop()


# -- 8. a malformed Authorization header ----------------------------------------------------------


def test_a_malformed_authorization_header_is_a_401(peerd):
    for path in (b"/api/tags", b"/v1/models", b"/api/hippo/peer/hello"):
        for value in (b"Bearer \xff\xfe", b"Bearer \xed\xa0\x80", b"\xff\xfe", b"Bearer " + KEY.encode() + b"\xff"):
            raw = (b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value
                   + b"\r\nConnection: close\r\n\r\n")
            answer = send_raw(peerd.port, raw)
            assert answer.status == 401, (path, value, answer.status, answer.text)
            assert "Error" not in answer.text.replace("error", "") and "Traceback" not in answer.text
    ring = trust.Keyring(FAKE_ID, SECRET)
    for header in (trust.H_NODE, trust.H_NONCE, trust.H_TIME, trust.H_SIGNATURE):  # the peer's own headers
        signed = ring.sign("GET", "/api/hippo/peer/manifest?model=x", b"", node_id(peerd))
        signed[header] = "\xff\xfe"
        raw = request_bytes("GET", b"/api/hippo/peer/manifest?model=x", headers=signed).replace(
            "\xff\xfe".encode(), b"\xff\xfe")  # the raw bytes, not their UTF-8 encoding
        answer = send_raw(peerd.port, raw)
        assert answer.status == 403, (header, answer.status, answer.text)
    assert "unhandled error" not in peerd.log()
    record("probe", malformed_authorization=401)


# -- on a LAN: the `from` error, the Host check, and mDNS strangers -------------------------------


@pytest.mark.netns
@pytest.mark.slow
def test_on_a_lan_the_from_error_host_check_and_off_subnet_announcements(tmp_path):
    from zeroconf import ServiceInfo, Zeroconf

    from tests.netns import in_netns, lan
    from tests.test_auth import call

    with lan(2, subnet="10.79.0") as net:
        a = Daemon(tmp_path / "a", host=net[0].address, netns=net[0].ns,
                   env={"HIPPO_API_KEY": KEY, "HIPPO_DISCOVERY": "true", "HIPPO_NODE_NAME": "alpha"}).start()
        zc = None
        try:
            url = f"http://{net[0].address}:{a.port}"
            wait_until(lambda: in_netns(net[1].ns, call, url, "GET", "/api/version", key=KEY)[0] == 200, 20,
                       "alpha answers on the LAN")
            # From another machine (a key holder): missing, unreadable and not-a-model look the same.
            errors = set()
            for path in ("/no/such/path", "/etc", "/etc/passwd", str(tmp_path / "a" / "hippo.db")):
                status, body, _ = in_netns(net[1].ns, call, url, "POST", "/api/create",
                                           {"model": "x", "from": path, "stream": False}, key=KEY)
                assert status == 400, body
                errors.add(body["error"].replace(repr(path), "PATH"))
            assert len(errors) == 1, errors
            # Host: the bound address passes (peers call each other so); a foreign name does not.
            assert in_netns(net[1].ns, call, url, "GET", "/api/tags", key=KEY)[0] == 200
            status, body, _ = in_netns(net[1].ns, call, url, "GET", "/api/tags", key=KEY,
                                       headers={"Host": "evil.example"})
            assert status == 403, body

            # mDNS: one stranger names an address on our subnet, another an address elsewhere.
            def announce():
                z = Zeroconf(interfaces=[net[1].address])
                for i, address in enumerate((net[1].address, "203.0.113.7")):
                    z.register_service(ServiceInfo(
                        "_hippo._tcp.local.", f"stranger{i}._hippo._tcp.local.", port=a.port,
                        properties={"id": f"{i + 1}" * 32, "name": f"stranger{i}", "port": str(a.port)},
                        server=f"stranger{i}.local.", parsed_addresses=[address]))
                return z
            zc = in_netns(net[1].ns, announce)

            def peers():
                return {n["node_id"]: n for n in in_netns(net[0].ns, call, url, "GET", "/api/hippo/nodes",
                                                          key=KEY)[1]["nodes"]}
            wait_until(lambda: "1" * 32 in peers(), 20, "the on-subnet announcement is listed", interval=0.3)
            time.sleep(1.0)
            assert "2" * 32 not in peers(), peers()["2" * 32]
            record("probe", off_subnet_announcements_ignored=1, remote_from_errors_distinct=len(errors))
        finally:
            if zc is not None:
                zc.close()
            a.stop()
