"""API key, CORS and the non-loopback guard, against real hippod processes."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.error
import urllib.request

import ollama
import openai
import pytest

from hippod.api import ui
from hippod.api.app import build_app
from hippod.config import load_settings
from hippod.protocol import FORWARD_PATH
from hippod.registry.registry import Registry
from hippod.scheduler import Scheduler
from hippod.api import ui
from hippod.store.database import Store
from tests.daemon import REPO_ROOT, Daemon, free_port

KEY = "test-key-0123456789"


class KeyedDaemon(Daemon):
    """A Daemon whose own calls (readiness ping, request) carry the API key."""

    def __init__(self, *a, key: str = KEY, **kw):
        super().__init__(*a, **kw)
        self.key = key
        self.env["HIPPO_API_KEY"] = key

    def ping(self) -> bool:
        return call(self.url, "GET", "/api/version", key=self.key)[0] == 200

    def request(self, method, path, body=None, timeout: float = 120.0):
        return call(self.url, method, path, body, key=self.key, timeout=timeout)


def call(url: str, method: str, path: str, body=None, *, key: str | None = None,
         headers: dict | None = None, timeout: float = 30.0):
    """(status, parsed JSON or text, headers) of one plain HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    except (ConnectionError, urllib.error.URLError):
        return 0, None, {}
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


PUBLIC = {(m, p) for m in ("GET", "HEAD") for p in ui.PATHS}


def app_routes(tmp_path) -> list[tuple[str, str]]:
    """Every (method, path) the real app serves, path parameters filled in."""
    settings = load_settings({"home": str(tmp_path / "routes-home")}, environ={})
    settings.ensure_dirs()
    store = Store(settings.db_path)
    try:
        registry = Registry(settings, store)
        app = build_app(settings, store, registry, Scheduler(settings, store, registry, "n"))
        out = []
        for route in app.router.routes():
            path = route.resource.canonical
            path = path.replace("{model}", "nosuch").replace("sha256-{sha256}", "sha256-" + "0" * 64)
            path = path.replace("{digest}", "sha256-" + "0" * 64)
            assert "{" not in path, path
            out.append((route.method, path))
        return sorted(set(out))
    finally:
        store.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with KeyedDaemon(tmp_path_factory.mktemp("keyed")) as d:
        yield d


def test_every_route_wants_the_key_and_passes_with_it(keyed, tmp_path):
    routes = app_routes(tmp_path) + [("GET", "/no/such/route"), ("POST", "/api/hippo/peer/nowhere")]
    assert len(routes) > 25 and ("GET", "/metrics") in routes and ("HEAD", "/") in routes
    assert ("POST", FORWARD_PATH) in routes  # a forwarded request: the key, then the cluster's HMAC
    # the chat page's static HTML is public (it holds no data; it asks for the key itself)
    public = [(m, p) for m, p in routes if m in ("GET", "HEAD") and p in ui.PATHS]
    assert public and all(call(keyed.url, m, p)[0] == 200 for m, p in public)
    routes = [r for r in routes if r not in public]
    for method, path in routes:
        body = {} if method in ("POST", "DELETE") else None
        if (method, path) in PUBLIC:  # the chat page's static HTML: it asks for the key itself
            status, answer, _ = call(keyed.url, method, path, body)
            assert status == 200 and (method == "HEAD" or "hippo" in answer), (method, path, status)
            continue
        for key, why in ((None, "missing"), ("wrong-key", "wrong")):
            status, answer, headers = call(keyed.url, method, path, body, key=key)
            assert status == 401, (method, path, key, status, answer)
            if method == "HEAD":
                continue
            assert headers["WWW-Authenticate"].startswith("Bearer")
            if path.startswith("/v1/"):
                assert answer["error"]["type"] == "authentication_error" and why in answer["error"]["message"]
            else:
                assert isinstance(answer["error"], str) and why in answer["error"]
        status, answer, _ = call(keyed.url, method, path, body, key=KEY)
        assert status != 401, (method, path, answer)
        if path.startswith("/api/hippo/peer/"):
            assert status == 403  # past the key, the cluster's HMAC is still required
    assert call(keyed.url, "GET", "/", key=KEY)[1] == "Ollama is running"
    # "Bearer" is case-insensitive, the token is not
    assert call(keyed.url, "GET", "/api/tags", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert call(keyed.url, "GET", "/api/tags", headers={"Authorization": f"Bearer {KEY.upper()}"})[0] == 401
    assert call(keyed.url, "GET", "/api/tags", headers={"Authorization": KEY})[0] == 401


def test_the_real_clients_with_and_without_the_key(keyed):
    assert openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY).models.list().data == []
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"}).list().models == []
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url).list()
    assert e.value.status_code == 401


def test_refuses_a_non_loopback_address_without_a_key(tmp_path):
    env = {"HIPPO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HIPPO_DISCOVERY": "false"}
    proc = subprocess.run([sys.executable, "-m", "hippod.daemon", "--host", "0.0.0.0", "--port",
                           str(free_port())], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in proc.stderr


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("cors"), env={"HIPPO_ORIGINS": "https://app.example"}) as d:
        yield d


def test_cors_allows_local_and_configured_origins_and_refuses_others(open_daemon):
    url = open_daemon.url
    for origin in ("http://localhost:5173", "http://127.0.0.1", "https://app.example"):
        status, _, headers = call(url, "GET", "/api/tags", headers={"Origin": origin})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
    status, answer, headers = call(url, "GET", "/api/tags", headers={"Origin": "https://evil.example"})
    assert status == 403 and "not allowed" in answer["error"]
    assert "Access-Control-Allow-Origin" not in headers
    status, answer, _ = call(url, "POST", "/v1/chat/completions", {}, headers={"Origin": "http://localhost.evil.example"})
    assert status == 403 and "not allowed" in answer["error"]["message"]
    # no Origin (curl, SDKs): CORS does not apply
    status, _, headers = call(url, "GET", "/api/tags")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_cors_headers_reach_streams_and_preflights_skip_the_key(open_daemon, tmp_path):
    conn = http.client.HTTPConnection("127.0.0.1", open_daemon.port, timeout=30)
    conn.request("POST", "/api/create", json.dumps({"model": "x", "from": str(tmp_path / "none.gguf")}),
                 {"Origin": "http://localhost:3000", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    assert resp.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    assert "error" in json.loads(resp.read().splitlines()[-1])
    conn.close()


def test_preflight_is_answered_without_the_key(keyed):
    headers = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    status, _, h = call(keyed.url, "OPTIONS", "/v1/chat/completions", headers=headers)
    assert status == 204
    assert h["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in h["Access-Control-Allow-Methods"] and "authorization" in h["Access-Control-Allow-Headers"]
    status, _, _ = call(keyed.url, "OPTIONS", "/v1/chat/completions",
                        headers={**headers, "Origin": "https://evil.example"})
    assert status == 403
