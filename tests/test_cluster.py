"""The cluster with real daemons on private LANs of network namespaces (tests/netns.py).

Each hippod runs in its own namespace, bound to its veth address, with mDNS on that address
only. Covered: discovery and staleness, `cluster init` / `join`, a peer copy that is byte-identical
and generates the same tokens, resume after the copying daemon is killed, refusal of nodes with
another secret and of replayed requests, and the copy's throughput next to raw TCP on the same veth.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from argparse import Namespace
from pathlib import Path

import pytest

from hippoctl import cluster_cmds
from hippoctl.client import Client, HippoError
from hippod.cluster import transfer, trust
from tests.daemon import Daemon
from tests.modelfiles import make_tiny_llama
from tests.netns import in_netns, lan, shaped, start_in_netns
from tests.netns import raw_tcp as netns_raw_tcp

NETNS = [pytest.mark.netns, pytest.mark.slow]


# -- helpers ----------------------------------------------------------------------------------


class Node:
    """One hippod in its namespace; every call to it is made from inside that namespace."""

    def __init__(self, net_node, home: Path, name: str, env: dict | None = None):
        self.net = net_node
        self.name = name
        self.daemon = Daemon(home, host=net_node.address, netns=net_node.ns, args=["--insecure"],
                             env={"HIPPO_DISCOVERY": "true", "HIPPO_NODE_NAME": name, **(env or {})})

    @property
    def home(self) -> Path:
        return self.daemon.home

    @property
    def node_id(self) -> str:
        return (self.home / "node-id").read_text().strip()

    def start(self) -> "Node":
        log = self.daemon.log_path
        if log.exists():  # the harness looks for "listening on" in the whole log: keep restarts apart
            log.rename(log.with_suffix(f".{int(time.time() * 1000)}.log"))
        self.daemon.start()
        wait_until(lambda: in_netns(self.net.ns, self.daemon.ping), 20, f"{self.name} answers")
        return self

    def advertising(self) -> bool:
        return self.nodes()["discovery"]["advertising"]

    def call(self, method: str, path: str, body=None, timeout: float = 300):
        return in_netns(self.net.ns, self.daemon.request, method, path, body, timeout)

    def cli(self, command, **args) -> str:
        """A hippoctl command function against this daemon; what it printed on stdout."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            in_netns(self.net.ns, command, Client(self.daemon.url), Namespace(**args))
        return out.getvalue()

    def nodes(self) -> dict:
        status, body = self.call("GET", "/api/hippo/nodes")
        assert status == 200, body
        return body

    def row(self, other: "Node") -> dict | None:
        return next((n for n in self.nodes()["nodes"] if n["node_id"] == other.node_id), None)

    def files(self, model: str) -> list[dict]:
        status, body = self.call("POST", "/api/show", {"model": model})
        assert status == 200, body
        return body["hippo"]["files"]

    def generate(self, model: str) -> dict:
        status, body = self.call("POST", "/api/generate", {
            "model": model, "prompt": "Once upon a time", "stream": False,
            "options": {"num_predict": 4, "temperature": 0}})
        assert status == 200, body
        return body


def wait_until(cond, timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds until cond() is true; fails the test after `timeout`."""
    start = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - start
        except (OSError, AssertionError):
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting until {what}")
        time.sleep(interval)


def joined(a: Node, b: Node) -> None:
    """Give b a's cluster secret (init on a, join on b) unless it has it, and wait for mutual trust."""
    if not trusted_and_fresh(b, a):
        _, answer = a.call("POST", "/api/hippo/cluster/init", {})
        status, body = b.call("POST", "/api/hippo/cluster/join", {"token": answer["token"]})
        assert status == 200, body
    wait_until(lambda: trusted_and_fresh(a, b) and trusted_and_fresh(b, a), 10, "both trust each other")


def trusted_and_fresh(a: Node, b: Node) -> bool:
    row = a.row(b)
    return bool(row and row["trusted"] and not row["stale"])


def ndjson(text) -> list[dict]:
    if isinstance(text, dict):
        return [text]
    return [json.loads(line) for line in str(text).splitlines() if line.strip()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def signed_request(node: Node, keyring: trust.Keyring, to: str, method: str, path: str, body: bytes = b"",
                   headers: dict | None = None):
    """(status, body bytes, headers used): one request signed by `keyring`, sent from the node's namespace."""
    import urllib.error
    import urllib.request

    headers = headers or keyring.sign(method, path, body, to)

    def send():
        req = urllib.request.Request(node.daemon.url + path, data=body or None, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, raw = in_netns(node.net.ns, send)
    return status, raw, headers


# -- trust, without daemons ---------------------------------------------------------------------


def test_join_token_round_trip_and_damage():
    secret = trust.new_secret()
    token = trust.make_token(secret)
    assert token.startswith("hippo1.") and trust.parse_token(f"  {token}\n") == secret
    with pytest.raises(trust.TrustError, match="damaged"):
        trust.parse_token(token[:-1] + ("0" if token[-1] != "0" else "1"))
    with pytest.raises(trust.TrustError, match="not a hippo join token"):
        trust.parse_token("hello")


def test_signatures_window_replay_and_addressee():
    secret = trust.new_secret()
    alice, bob = trust.Keyring("a" * 32, secret), trust.Keyring("b" * 32, secret)
    body = b'{"x":1}'
    headers = alice.sign("POST", "/api/hippo/peer/hello", body, bob.node_id)
    assert trust.H_SIGNATURE in headers and secret not in json.dumps(headers)
    assert bob.verify("POST", "/api/hippo/peer/hello", body, headers) == alice.node_id
    with pytest.raises(trust.TrustError, match="replay"):
        bob.verify("POST", "/api/hippo/peer/hello", body, headers)
    fresh = alice.sign("POST", "/api/hippo/peer/hello", body, bob.node_id)
    for method, path, data in (("GET", "/api/hippo/peer/hello", body), ("POST", "/api/hippo/peer/x", body),
                               ("POST", "/api/hippo/peer/hello", b'{"x":2}')):
        with pytest.raises(trust.TrustError, match="does not match"):
            bob.verify(method, path, data, fresh)
    with pytest.raises(trust.TrustError, match="too|off"):
        bob.verify("POST", "/api/hippo/peer/hello", body, fresh, now=time.time() + 3600)
    with pytest.raises(trust.TrustError, match="another node"):
        alice.verify("POST", "/api/hippo/peer/hello", body, alice.sign("POST", "/api/hippo/peer/hello", body, "c" * 32))
    stranger = trust.Keyring("c" * 32, trust.new_secret())
    with pytest.raises(trust.TrustError, match="does not match"):
        bob.verify("GET", "/p", b"", stranger.sign("GET", "/p", b"", bob.node_id))
    with pytest.raises(trust.TrustError, match="not signed"):
        bob.verify("GET", "/p", b"", {trust.H_NODE: "c" * 32})
    # Answers are bound to their request's nonce and to the responder.
    sig = bob.sign_response("n1", 200, b"{}")
    assert alice.verify_response("n1", 200, b"{}", sig, bob.node_id)
    assert not alice.verify_response("n2", 200, b"{}", sig, bob.node_id)
    assert not alice.verify_response("n1", 200, b"{}", sig, "c" * 32)
    assert not stranger.verify_response("n1", 200, b"{}", sig, bob.node_id)


def test_key_file_is_private(tmp_path):
    secret = trust.new_secret()
    path = trust.save_secret(tmp_path, secret)
    assert path == tmp_path / "cluster.key" and (path.stat().st_mode & 0o777) == 0o600
    assert trust.load_secret(None, tmp_path) == secret
    other = trust.new_secret()
    assert trust.load_secret(trust.make_token(other), tmp_path) == other  # configuration wins


def test_discovery_never_uses_every_interface_for_a_loopback_daemon():
    from hippod.cluster.discovery import discovery_addresses

    assert discovery_addresses(True, (), "127.0.0.1")[0] == []
    assert discovery_addresses(False, ("lo",), "10.1.2.3")[0] == []
    assert discovery_addresses(True, ("lo",), "127.0.0.1")[0] == []  # loopback is never used
    assert discovery_addresses(True, ("no-such-if0",), "127.0.0.1")[0] == []


# -- two Macs on one LAN ------------------------------------------------------------------------


class Pair:
    def __init__(self, net, root: Path):
        self.net = net
        self.a = Node(net[0], root / "alpha", "alpha")
        self.b = Node(net[1], root / "beta", "beta")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    with lan(2) as net:
        p = Pair(net, root)
        try:
            p.a.start()
            p.b.start()
            p.started = time.monotonic()
            yield p
        finally:
            p.a.daemon.stop()
            p.b.daemon.stop()


@pytest.mark.netns
@pytest.mark.slow
def test_nodes_find_each_other_join_and_go_stale(pair):
    a, b = pair.a, pair.b
    wait_until(lambda: a.row(b) and b.row(a), 5 - (time.monotonic() - pair.started), "each lists the other")
    assert not a.row(b)["trusted"], "no secret yet: a peer is only seen, not trusted"
    status, body = b.call("POST", "/api/hippo/peer/hello", {"node_id": "x"})
    assert status == 403

    printed = a.cli(cluster_cmds.cluster, action="init", token=None)
    token = printed.split("hippoctl cluster join ", 1)[1].split()[0]
    assert trust.parse_token(token)
    assert (a.home / "cluster.key").stat().st_mode & 0o777 == 0o600
    assert a.cli(cluster_cmds.cluster, action="init", token=None).split()[-1] == token  # idempotent
    with pytest.raises(HippoError, match="damaged"):
        b.cli(cluster_cmds.cluster, action="join", token=token[:-2] + "zz")
    assert "joined cluster" in b.cli(cluster_cmds.cluster, action="join", token=token)
    wait_until(lambda: trusted_and_fresh(a, b) and trusted_and_fresh(b, a), 10, "both trust each other")

    table = a.cli(cluster_cmds.nodes, json=False)
    header, *rows = table.splitlines()
    assert header.split() == ["NODE", "ADDRESS", "VERSION", "MEMORY", "FREE/TOTAL", "MODELS", "LOADED",
                              "TRUSTED", "LAST", "SEEN"]
    beta = next(r for r in rows if r.startswith("beta"))
    assert f"{b.net.address}:{b.daemon.port}" in beta and " yes " in beta
    assert json.loads(a.cli(cluster_cmds.nodes, json=True))["node_id"] == a.node_id

    # A peer that stops answering (killed: no mDNS goodbye) is stale within 10 s, and unusable.
    b.daemon.kill()
    took = wait_until(lambda: a.row(b)["stale"], 10, "the killed peer is stale")
    print(f"stale after {took:.1f}s")
    assert "(stale)" in a.cli(cluster_cmds.nodes, json=False)
    status, body = a.call("POST", "/api/hippo/pull", {"model": "anything", "from": "beta", "stream": False})
    assert status == 503 and "not answering" in body["error"]
    b.start()  # the joined secret survived the restart (cluster.key)
    wait_until(lambda: trusted_and_fresh(a, b) and trusted_and_fresh(b, a), 10, "the peer is back")
    wait_until(b.advertising, 10, "the peer is on mDNS again")
    # A clean stop says goodbye over mDNS: stale at once.
    b.daemon.stop()
    took = wait_until(lambda: a.row(b)["stale"], 10, "the stopped peer is stale")
    assert took < 3, took
    b.start()
    wait_until(lambda: trusted_and_fresh(a, b) and trusted_and_fresh(b, a), 10, "the peer is back")


@pytest.mark.netns
@pytest.mark.slow
def test_pull_copies_from_the_peer_byte_identical(pair, tiny_model_dir):
    a, b = pair.a, pair.b
    joined(a, b)
    status, body = a.call("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
    assert status == 200, body
    wait_until(lambda: "tiny:latest" in b.row(a)["models"], 5, "beta sees alpha's model")

    out = b.cli(cluster_cmds.pull, model="tiny", from_node=None)  # peers first, no --from
    assert "copying from peer alpha" in out and "success" in out.splitlines()[-1]
    a_files, b_files = a.files("tiny"), b.files("tiny")
    assert a_files == b_files
    for f in b_files:
        blob = b.home / "blobs" / f"sha256-{f['sha256']}"
        assert blob.read_bytes() == (a.home / "blobs" / f"sha256-{f['sha256']}").read_bytes()
        assert sha256(blob) == f["sha256"]
    assert (tiny_model_dir / "model.safetensors").read_bytes() == (
        b.home / "blobs" / f"sha256-{next(f['sha256'] for f in b_files if f['name'] == 'model.safetensors')}"
    ).read_bytes()
    _, shown = b.call("POST", "/api/show", {"model": "tiny"})
    assert shown["hippo"]["source"] == "peer:alpha"
    assert not list((b.home / "blobs").glob(".partial-*"))

    ga, gb = a.generate("tiny"), b.generate("tiny")
    assert gb["eval_count"] == ga["eval_count"] == 4
    assert gb["response"] == ga["response"]
    wait_until(lambda: "tiny:latest" in b.row(a)["loaded"], 5, "beta sees what alpha has loaded")

    # Pulling again is a no-op; --from names the peer; a model no peer has goes to the hub.
    out = b.cli(cluster_cmds.pull, model="tiny", from_node="alpha")
    assert "up to date" in out
    with pytest.raises(HippoError, match="does not have model"):
        b.cli(cluster_cmds.pull, model="other", from_node="alpha")
    with pytest.raises(HippoError, match="not in the catalog"):
        b.cli(cluster_cmds.pull, model="other", from_node=None)
    with pytest.raises(HippoError, match="no peer named"):
        b.cli(cluster_cmds.pull, model="tiny", from_node="gamma")


@pytest.mark.netns
@pytest.mark.slow
def test_pull_smollm2_from_the_peer(pair):
    """The real SmolLM2 (converted from its GGUF), copied over the LAN, answers the same."""
    from tests.modelfiles import smollm2_mlx_dir

    a, b = pair.a, pair.b
    joined(a, b)
    status, body = a.call("POST", "/api/create", {"model": "smollm2", "from": str(smollm2_mlx_dir()),
                                                  "stream": False})
    assert status == 200, body
    wait_until(lambda: "smollm2:latest" in b.row(a)["models"], 5, "beta sees smollm2")
    status, text = b.call("POST", "/api/hippo/pull", {"model": "smollm2"})
    assert status == 200 and ndjson(text)[-1] == {"status": "success"}, text
    assert b.files("smollm2") == a.files("smollm2")
    ga, gb = a.generate("smollm2"), b.generate("smollm2")
    assert ga["eval_count"] == gb["eval_count"] == 4 and ga["response"] == gb["response"]
    for node in (a, b):  # free the memory for the tests that follow
        node.call("POST", "/api/generate", {"model": "smollm2", "keep_alive": 0})


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> Path:
    """About 100 MB of weights (a wide embedding), for resume and throughput."""
    return make_tiny_llama(tmp_path_factory.mktemp("big") / "big", hidden_size=1024, num_layers=1, seed=5)


@pytest.mark.netns
@pytest.mark.slow
def test_killed_copy_resumes(pair, big_model_dir):
    a, b = pair.a, pair.b
    joined(a, b)
    status, body = a.call("POST", "/api/create", {"model": "big", "from": str(big_model_dir), "stream": False})
    assert status == 200, body
    wait_until(lambda: trusted_and_fresh(b, a) and "big:latest" in b.row(a)["models"], 10, "beta sees big")
    weights = next(f for f in a.files("big") if f["name"] == "model.safetensors")
    assert weights["size"] > 90e6
    blob = b.home / "blobs" / f"sha256-{weights['sha256']}"
    partial = blob.parent / f".partial-{weights['sha256']}"
    held = lambda: transfer.partial_bytes(blob, weights["sha256"], weights["size"])  # noqa: E731

    with shaped(a.net.ns, a.net.ifname, "80mbit"):  # ~10 MB/s: a copy takes ~10 s, time to cut it
        thread, result = start_in_netns(b.net.ns, b.daemon.request, "POST", "/api/hippo/pull",
                                        {"model": "big", "from": "alpha"}, 120)
        wait_until(lambda: held() > 8e6, 30, "the copy is under way", interval=0.02)
        b.daemon.kill()
        thread.join(30)
    cut = held()  # what the copy recorded as on disk, over all its ranges
    assert 8e6 < cut < weights["size"]

    b.start()
    wait_until(lambda: trusted_and_fresh(b, a), 10, "beta trusts alpha again")
    status, text = b.call("POST", "/api/hippo/pull", {"model": "big", "from": "alpha"})
    events = ndjson(text)
    assert status == 200 and events[-1] == {"status": "success"}, events[-3:]
    resumed = [e for e in events if e["status"].startswith("resuming model.safetensors at ")]
    assert resumed and resumed[0]["completed"] == cut, events[:6]
    sizes = [e["completed"] for e in events if e.get("digest") == f"sha256:{weights['sha256']}"]
    assert min(sizes) >= cut, "the resumed copy started over"
    assert sha256(blob) == weights["sha256"] and not partial.exists()
    assert b.files("big") == a.files("big")


@pytest.mark.netns
@pytest.mark.slow
def test_peer_copy_throughput_against_raw_tcp(pair, big_model_dir, capsys):
    """Not a pass/fail bound: prints the peer copy's rate next to raw TCP on the same veth."""
    a, b = pair.a, pair.b
    joined(a, b)
    status, _ = a.call("POST", "/api/create", {"model": "big", "from": str(big_model_dir), "stream": False})
    assert status == 200
    b.call("DELETE", "/api/delete", {"model": "big"})
    weights = next(f for f in a.files("big") if f["name"] == "model.safetensors")
    assert not (b.home / "blobs" / f"sha256-{weights['sha256']}").exists()
    wait_until(lambda: trusted_and_fresh(b, a), 10, "beta trusts alpha")
    total = sum(f["size"] for f in a.files("big"))

    start = time.perf_counter()
    status, text = b.call("POST", "/api/hippo/pull", {"model": "big", "from": "alpha"})
    peer_seconds = time.perf_counter() - start
    assert status == 200 and ndjson(text)[-1] == {"status": "success"}
    assert b.files("big") == a.files("big")

    raw_bytes, raw_seconds = raw_tcp(a, b, a.home / "blobs" / f"sha256-{weights['sha256']}")
    copied = [line for line in b.daemon.log().splitlines() if "copied big:latest from peer alpha" in line]
    with capsys.disabled():
        print(f"\n[throughput] peer copy (HTTP+HMAC, sha256, write, record): {total / 1e6:.1f} MB in "
              f"{peer_seconds:.2f}s = {total / peer_seconds / 1e6:.0f} MB/s end to end")
        if copied:
            print(f"[throughput] daemon says: {copied[-1].split('hippo.transfer INFO ')[-1]}")
        print(f"[throughput] raw TCP (sendfile -> recv, no disk, no hash): {raw_bytes / 1e6:.1f} MB in "
              f"{raw_seconds:.2f}s = {raw_bytes / raw_seconds / 1e6:.0f} MB/s, same veth, same run")


def raw_tcp(a: Node, b: Node, path: Path) -> tuple[int, float]:
    """Send the file from a's namespace to b's over one TCP connection; (bytes, seconds at b)."""
    n, seconds = netns_raw_tcp(a.net.ns, a.net.address, b.net.ns, path)
    assert n == path.stat().st_size
    return n, seconds


# -- a stranger on the LAN ------------------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.slow
def test_node_with_another_secret_sees_peers_but_gets_403(tmp_path, tiny_model_dir):
    secret, wrong = trust.new_secret(), trust.new_secret()
    with lan(3) as net:
        a = Node(net[0], tmp_path / "a", "alpha", {"HIPPO_CLUSTER_SECRET": trust.make_token(secret)})
        b = Node(net[1], tmp_path / "b", "beta", {"HIPPO_CLUSTER_SECRET": secret})
        c = Node(net[2], tmp_path / "c", "gamma", {"HIPPO_CLUSTER_SECRET": wrong,
                                                   "HIPPO_DISCOVERY_INTERFACES": net[2].ifname})
        try:
            for n in (a, b, c):
                n.start()
            assert c.nodes()["discovery"]["addresses"] == [net[2].address]  # by interface name
            status, body = a.call("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir),
                                                          "stream": False})
            assert status == 200, body
            wait_until(lambda: trusted_and_fresh(a, b) and trusted_and_fresh(b, a), 10, "a and b trust")
            wait_until(lambda: c.row(a) and c.row(b) and a.row(c) and b.row(c), 10, "everyone sees gamma")
            time.sleep(2)  # a few probe rounds: trust must not appear
            assert not c.row(a)["trusted"] and not c.row(b)["trusted"]
            assert not a.row(c)["trusted"] and not b.row(c)["trusted"]
            assert c.row(a)["models"] == [] and a.row(c)["models"] == []
            with pytest.raises(HippoError, match="not trusted"):
                c.cli(cluster_cmds.pull, model="tiny", from_node="alpha")
            status, body = c.call("POST", "/api/hippo/cluster/join", {"token": trust.make_token(secret)})
            assert status == 409  # its secret comes from configuration

            # Every peer endpoint of alpha refuses gamma, signed with its own (wrong) secret or not at all.
            sha = a.files("tiny")[0]["sha256"]
            keyring = trust.Keyring(c.node_id, wrong)
            hello = json.dumps({"node_id": c.node_id, "name": "gamma", "version": "0", "port": 1}).encode()
            attempts = [("POST", "/api/hippo/peer/hello", hello), ("GET", "/api/hippo/peer/manifest?model=tiny", b""),
                        ("GET", f"/api/hippo/peer/blobs/sha256-{sha}", b""), ("GET", "/api/hippo/peer/nope", b""),
                        ("GET", "/api/hippo/peer", b"")]
            for method, path, data in attempts:
                for ring in (keyring, trust.Keyring(c.node_id, None)):
                    status, raw, _ = signed_request(a, ring, a.node_id, method, path, data)
                    assert status == 403, (method, path, raw[:200])
                    assert sha.encode() not in raw and b"tiny" not in raw
            assert not list((c.home / "blobs").glob("sha256-*"))

            # The right secret works once; the same signed request sent again is refused.
            good = trust.Keyring(b.node_id, secret)
            status, raw, headers = signed_request(a, good, a.node_id, "GET", "/api/hippo/peer/manifest?model=tiny")
            assert status == 200 and json.loads(raw)["files"]
            status, raw, _ = signed_request(a, good, a.node_id, "GET", "/api/hippo/peer/manifest?model=tiny",
                                            headers=headers)
            assert status == 403 and b"replay" in raw
            # Blobs too, with Range (what a resumed copy asks for).
            blob = (a.home / "blobs" / f"sha256-{sha}").read_bytes()
            path = f"/api/hippo/peer/blobs/sha256-{sha}"
            status, raw, _ = signed_request(a, good, a.node_id, "GET", path,
                                            headers={**good.sign("GET", path, b"", a.node_id), "Range": "bytes=10-"})
            assert status == 206 and raw == blob[10:]
            # ...and a request signed for alpha is refused by beta.
            headers = good.sign("GET", "/api/hippo/peer/manifest?model=tiny", b"", a.node_id)
            status, raw, _ = signed_request(b, good, a.node_id, "GET", "/api/hippo/peer/manifest?model=tiny",
                                            headers=headers)
            assert status == 403 and b"another node" in raw
        finally:
            for n in (a, b, c):
                n.daemon.stop()
