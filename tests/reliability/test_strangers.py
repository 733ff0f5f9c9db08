"""Strangers (issue 9): who may talk to hippod at all.

Already proven elsewhere, not repeated: every route wants the API key
(tests/test_auth.py::test_every_route_wants_the_key_and_passes_with_it), a non-loopback bind is
refused without a key, and a node with *another* cluster secret gets 403 from hello, manifest
and blobs (tests/test_cluster.py::test_node_with_another_secret_sees_peers_but_gets_403).
Here: the default bind, hostile requests without the key, and a stranger with *no* secret on
the same veth that tries every peer route (split routes included), the secret's own routes,
prompts, and being given layers of a split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hippod.cluster import trust
from tests.daemon import REPO_ROOT, free_port
from tests.modelfiles import make_tiny_llama
from tests.reliability.conftest import FULL, record
from tests.reliability.wire import send
from tests.test_auth import KEY, PUBLIC, KeyedDaemon, app_routes


def _non_loopback_ipv4() -> list[str]:
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append(a.address)
    return out


def test_default_bind_is_loopback_only(tmp_path):
    """No --host, no HIPPO_HOST, discovery left at its default: only 127.0.0.1 listens."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
    env.update(HIPPO_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hippod.daemon", "--port", str(port)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if send(port, "GET", "/api/version", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("hippod did not answer on 127.0.0.1")
        sockets = psutil.Process(proc.pid).net_connections(kind="inet")  # TCP and UDP (mDNS would be UDP)
        assert all(not c.laddr or c.laddr.ip == "127.0.0.1" for c in sockets), sockets
        listening = [c for c in sockets if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
        assert port in {c.laddr.port for c in listening}
        for address in _non_loopback_ipv4():  # this machine's other addresses: nobody home
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
        record("strangers", default_bind="127.0.0.1", other_addresses_refused=len(_non_loopback_ipv4()))
    finally:
        proc.terminate()
        proc.wait(30)


# -- an API key: hostile requests without it never reach a handler ----------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with KeyedDaemon(tmp_path_factory.mktemp("keyed-rel"), env={"HIPPO_MAX_BODY_BYTES": "100000"}) as d:
        yield d


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    served = [r for r in app_routes(tmp_path_factory.mktemp("routes")) if r not in PUBLIC]
    return served + [("GET", "/no/such"), ("POST", "/api/hippo/peer/x")]


@settings(max_examples=400 if FULL else 80, deadline=None, database=None, derandomize=not FULL,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_without_the_key_every_hostile_request_is_a_401(keyed, routes, data):
    method, path = data.draw(st.sampled_from(routes))
    method = data.draw(st.sampled_from([method, method, "PUT", "PATCH", "OPTIONS"]))
    body = data.draw(st.one_of(st.binary(max_size=200), st.just(b"{" * 50_000), st.just(b'{"model": "x"}'),
                               st.just(b"\xff\xfe")))
    header = data.draw(st.sampled_from(["", "Bearer", "Bearer ", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x",
                                        f"Bearer {KEY[:-1]}", "bearer  ", "Token " + KEY]))
    headers = {"Authorization": header} if header else {}
    answer = send(keyed.port, method, path, body, headers=headers, timeout=30)
    assert answer.status == 401, (method, path, header, answer.status, answer.text[:200])
    assert KEY not in answer.text
    record("strangers", keyless_hostile_requests_401=1)


def test_a_flood_of_refused_requests_cannot_fill_the_audit_log(keyed):
    """Anyone who reaches the port can be refused: at most REFUSED_PER_MINUTE refusals a minute
    are written to the audit log, however many come."""
    from hippod.audit import REFUSED_PER_MINUTE

    def refused_rows() -> int:
        answer = send(keyed.port, "GET", "/api/hippo/audit?limit=10000",
                      headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status == 200, answer
        return sum(1 for r in json.loads(answer.body)["requests"] if r["status"] == 401)

    before = refused_rows()
    flood = 3 * REFUSED_PER_MINUTE
    for _ in range(flood):
        assert send(keyed.port, "POST", "/api/generate", b'{"model": "x", "prompt": "hi"}').status == 401
    after = refused_rows()
    assert after - before <= REFUSED_PER_MINUTE, (before, after)
    assert after >= 1  # refusals are logged, up to the bound


def test_without_the_key_an_oversize_body_is_refused_unread(keyed):
    answer = send(keyed.port, "POST", "/api/generate", b"x" * 200_000, timeout=30)
    assert answer.status in (401, 413), answer.status


# -- a stranger with no secret on the same veth ----------------------------------------------------


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.reliability_full
def test_stranger_without_the_secret_on_the_same_veth(tmp_path):
    from tests.netns import in_netns, lan
    from tests.test_cluster import Node, wait_until

    secret = trust.new_secret()
    model = make_tiny_llama(tmp_path / "m", seed=51)
    with lan(2) as net:
        # alpha: the cluster's node, API key on, a budget too small for the model alone (it must split)
        alpha = Node(net[0], tmp_path / "alpha", "alpha", {"HIPPO_CLUSTER_SECRET": secret, "HIPPO_API_KEY": KEY,
                                                            "HIPPO_MEMORY_BUDGET": "60MB"})
        alpha.daemon.request = lambda method, path, body=None, timeout=120: _keyed(alpha, method, path, body, timeout)
        alpha.daemon.ping = lambda: _keyed(alpha, "GET", "/api/version", None, 2)[0] == 200
        stranger = Node(net[1], tmp_path / "stranger", "stranger", {"HIPPO_MEMORY_BUDGET": "8GB"})
        try:
            alpha.start()
            stranger.start()
            status, body = alpha.call("POST", "/api/create", {"model": "m", "from": str(model), "stream": False})
            assert status == 200, body
            wait_until(lambda: alpha.row(stranger) and stranger.row(alpha), 15, "each sees the other on mDNS")
            assert not alpha.row(stranger)["trusted"] and not stranger.row(alpha)["trusted"]
            url = f"http://{alpha.net.address}:{alpha.daemon.port}"
            refused = 0

            def from_stranger(method, path, body=None, headers=None):
                def go():
                    import urllib.error
                    import urllib.request
                    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
                    req = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
                    try:
                        with urllib.request.urlopen(req, timeout=30) as r:
                            return r.status, r.read()
                    except urllib.error.HTTPError as e:
                        return e.code, e.read()
                return in_netns(stranger.net.ns, go)

            # Prompts, lists, pulls through the user API: the key is asked for.
            for method, path, body in [("GET", "/api/tags", None), ("GET", "/v1/models", None),
                                       ("POST", "/api/generate", {"model": "m", "prompt": "hi", "stream": False}),
                                       ("POST", "/v1/chat/completions", {"model": "m", "messages": [
                                           {"role": "user", "content": "hi"}]}),
                                       ("POST", "/api/show", {"model": "m"}), ("POST", "/api/pull", {"model": "m"}),
                                       ("GET", "/api/hippo/nodes", None), ("POST", "/api/hippo/cluster/init", {})]:
                status, raw = from_stranger(method, path, body)
                assert status == 401 and b"m:latest" not in raw, (path, status, raw[:200])
                refused += 1
            # The secret's own routes answer only the node's machine, even to someone who has the key.
            for path, body in (("/api/hippo/cluster/init", {}), ("/api/hippo/cluster/join", {"token": trust.make_token(trust.new_secret())})):
                status, raw = from_stranger("POST", path, body, {"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"})
                assert status == 403 and b"hippo1." not in raw, (path, status, raw[:200])
                refused += 1
            # Every peer route, unsigned or signed without the secret, with or without the API key.
            sha = alpha.files("m")[0]["sha256"]
            no_secret = trust.Keyring(stranger.node_id, None)
            split = {"split": "evil", "model": "m", "digest": "0" * 64, "layers": [0, 1], "rank": 1, "world": 2,
                     "bytes": 1}
            attempts = [("GET", "/api/hippo/peer/manifest?model=m", b""), ("GET", f"/api/hippo/peer/blobs/sha256-{sha}", b""),
                        ("POST", "/api/hippo/peer/hello", json.dumps({"node_id": stranger.node_id}).encode())]
            attempts += [("POST", f"/api/hippo/peer/split/{r}", json.dumps(split).encode())
                         for r in ("budget", "prepare", "start", "ping", "stop")]
            for method, path, data in attempts:
                for headers in (no_secret.sign(method, path, data, alpha.node_id),
                                {**no_secret.sign(method, path, data, alpha.node_id), "Authorization": f"Bearer {KEY}"},
                                {"Authorization": f"Bearer {KEY}"}):
                    if "Authorization" not in headers:  # a made-up signature: past the key check, to the HMAC
                        headers = {**headers, trust.H_SIGNATURE: "0" * 64, trust.H_TIME: str(int(time.time())),
                                   trust.H_NONCE: os.urandom(8).hex()}
                    status, raw = from_stranger(method, path, data or None, headers)
                    assert status == 403, (method, path, status, raw[:200])
                    assert sha.encode() not in raw and b"m:latest" not in raw and b"available" not in raw
                    refused += 1
            # Being trusted never happens, so the stranger is never given layers: alpha's model,
            # too big for alpha alone, is refused rather than split onto the stranger's 8 GB.
            time.sleep(2)
            status, body = alpha.call("POST", "/api/generate", {"model": "m", "prompt": "hi", "stream": False,
                                                                "options": {"num_predict": 2}})
            assert status == 507 and "needs" in body["error"] and "stranger" not in body["error"], body
            status, ps = stranger.call("GET", "/api/ps")
            assert "hippo" not in ps and not stranger.daemon.runner_pids(), ps
            assert "prepared layers" not in stranger.daemon.log()
            assert not (stranger.home / "shards").exists()
            record("strangers", stranger_requests_refused=refused, stranger_given_layers=0)
        finally:
            alpha.daemon.stop()
            stranger.daemon.stop()


def _keyed(node, method, path, body, timeout):
    """A call to the keyed node from inside its namespace (the harness's own calls carry the key)."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(node.daemon.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
