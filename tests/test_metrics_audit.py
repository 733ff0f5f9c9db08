"""GET /metrics and the audit log, against real hippod processes serving a tiny real model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hippod.api.app import build_app
from hippod.config import load_settings
from hippod.registry.registry import Registry
from hippod.scheduler import Scheduler
from hippod.store.database import Store
from hippod.store.records import RequestRecord
from tests.daemon import REPO_ROOT

TINY = "tiny:latest"


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def audit_rows(d, **query) -> list[dict]:
    qs = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in query.items())
    status, body = d.request("GET", "/api/hippo/audit" + (f"?{qs}" if qs else ""))
    assert status == 200, body
    return body["requests"]


def create_tiny(d, tiny_model_dir) -> None:
    status, body = d.request("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
    assert status == 200, body


@pytest.mark.slow
def test_inference_is_counted_and_audited(daemon_factory, tiny_model_dir):
    d = daemon_factory("m", env={"HIPPO_AUDIT_PROMPTS": "1", "HIPPO_NUM_PARALLEL": "2"})
    create_tiny(d, tiny_model_dir)
    oc = ollama.Client(host=d.url)
    gen = oc.generate(model="tiny", prompt="hello audit", options={"num_predict": 8, "temperature": 0})
    chat = list(oc.chat(model="tiny", messages=[{"role": "user", "content": "hi chat"}], stream=True,
                        options={"num_predict": 6}))
    oa = openai.OpenAI(base_url=d.url + "/v1", api_key="unused")
    completion = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi openai"}],
                                            max_tokens=5)
    emb = oc.embed(model="tiny", input=["one two", "three"])
    oemb = oa.embeddings.create(model="tiny", input="four")
    with pytest.raises(ollama.ResponseError):
        oc.generate(model="nosuch", prompt="lost")

    rows = {r["route"] + ("!" if r["status"] != 200 else ""): r for r in audit_rows(d)}
    assert set(rows) == {"/api/generate", "/api/chat", "/v1/chat/completions", "/api/embed",
                         "/v1/embeddings", "/api/generate!"}
    for r in rows.values():
        assert r["client"] == "127.0.0.1" and r["total_seconds"] > 0 and r["time"]
    g = rows["/api/generate"]
    assert (g["model"], g["status"], g["error"]) == (TINY, 200, None)
    # every model was here; a request refused before it reached one got it from nowhere
    assert {k: r["model_source"] for k, r in rows.items()} == {**{k: "local" for k in rows}, "/api/generate!": None}
    assert (g["prompt_tokens"], g["completion_tokens"]) == (gen.prompt_eval_count, gen.eval_count) == (g["prompt_tokens"], 8)
    assert 0 < g["ttft_seconds"] <= g["total_seconds"]
    assert g["prompt"] == "hello audit"
    c = rows["/api/chat"]
    assert (c["prompt_tokens"], c["completion_tokens"]) == (chat[-1].prompt_eval_count, chat[-1].eval_count)
    assert json.loads(c["prompt"]) == [{"role": "user", "content": "hi chat"}]
    o = rows["/v1/chat/completions"]
    assert (o["prompt_tokens"], o["completion_tokens"]) == (completion.usage.prompt_tokens,
                                                           completion.usage.completion_tokens)
    e = rows["/api/embed"]
    assert e["model"] == TINY and e["prompt_tokens"] == emb.prompt_eval_count and json.loads(e["prompt"]) == ["one two", "three"]
    assert rows["/v1/embeddings"]["prompt_tokens"] == oemb.usage.prompt_tokens
    lost = rows["/api/generate!"]
    assert lost["status"] == 404 and lost["model"] == "nosuch" and "not found" in lost["error"]
    assert lost["prompt"] == "lost"

    m = metrics(d.url)
    assert value(m, "hippo_http_requests_total", route="/api/generate", method="POST", status="200") == 1
    assert value(m, "hippo_http_requests_total", route="/api/generate", method="POST", status="404") == 1
    assert value(m, "hippo_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert value(m, "hippo_http_requests_total", route="/api/create", method="POST", status="200") == 1
    assert value(m, "hippo_http_request_duration_seconds_count", route="/api/chat") == 1
    generated = [g, c, o]
    assert value(m, "hippo_completion_tokens_total", model=TINY) == sum(r["completion_tokens"] for r in generated)
    assert value(m, "hippo_prompt_tokens_total", model=TINY) == sum(
        r["prompt_tokens"] for k, r in rows.items() if not k.endswith("!"))
    assert value(m, "hippo_time_to_first_token_seconds_count", model=TINY) == 3
    assert value(m, "hippo_time_per_output_token_seconds_count", model=TINY) == 3
    assert 0 < value(m, "hippo_time_per_output_token_seconds_sum", model=TINY) < 3
    assert value(m, "hippo_model_load_seconds_count", model=TINY) == 1
    assert value(m, "hippo_loaded_models") == 1
    assert value(m, "hippo_model_memory_bytes", model=TINY) > 0
    assert value(m, "hippo_memory_budget_bytes") > value(m, "hippo_memory_used_bytes") > 0
    assert value(m, "hippo_model_active_requests", model=TINY) == 0
    assert value(m, "hippo_pending_requests") == 0
    assert value(m, "hippo_http_requests_in_flight") == 1  # this scrape
    assert all(value(m, "hippo_peers", state=s) == 0 for s in ("trusted", "untrusted", "stale"))
    assert ("hippo_peers", frozenset({("state", "trusted")})) in m


def hippoctl(host: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
    env.update(HIPPO_HOST=host, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "hippoctl", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=60)


def test_retention_prunes_old_rows_and_prompts_stay_out_by_default(daemon_factory, tmp_path):
    home = tmp_path / "r"
    now = datetime.now(timezone.utc)
    with Store(home / "hippo.db") as store:
        store.add_request(RequestRecord(client="10.0.0.9", endpoint="/api/chat", status=200, model="old:latest",
                                        time=now - timedelta(days=45)))
        store.add_request(RequestRecord(client="10.0.0.9", endpoint="/api/chat", status=200, model="recent:latest",
                                        model_source="copied from peer beta", prompt_tokens=7, completion_tokens=3, total_seconds=1.5,
                                        ttft_seconds=0.25, time=now - timedelta(days=3)))
    d = daemon_factory("r", env={"HIPPO_AUDIT_RETENTION_DAYS": "30"})
    deadline = time.monotonic() + 10
    while any(r["model"] == "old:latest" for r in audit_rows(d)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r["model"] for r in audit_rows(d)] == ["recent:latest"]

    status, body = d.request("POST", "/api/generate", {"model": "nosuch", "prompt": "secret prompt"})
    assert status == 404
    newest = audit_rows(d)[0]
    assert (newest["model"], newest["status"], newest["prompt"]) == ("nosuch", 404, None)
    assert [r["model"] for r in audit_rows(d, since="1d")] == ["nosuch"]
    assert [r["model"] for r in audit_rows(d, since=(now - timedelta(days=4)).isoformat())] == ["nosuch", "recent:latest"]
    assert [r["model"] for r in audit_rows(d, limit=1)] == ["nosuch"]
    assert d.request("GET", "/api/hippo/audit?since=yesterday")[0] == 400

    # a scraper that asks for OpenMetrics gets it
    req = urllib.request.Request(d.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().decode().endswith("# EOF\n")

    # hippoctl audit: a table, JSON, --since
    host = f"127.0.0.1:{d.port}"
    out = hippoctl(host, "audit")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:6] == ["TIME", "CLIENT", "ROUTE", "MODEL", "SOURCE", "IN"] and len(lines) == 3
    assert "nosuch" in lines[1] and "404" in lines[1] and "not found" in lines[1]
    assert "recent:latest" in lines[2] and "10.0.0.9" in lines[2] and "0.25s" in lines[2] and "1.50s" in lines[2]
    assert "copied from peer beta" in lines[2]
    out = hippoctl(host, "audit", "--json", "--since", "2d")
    assert [r["model"] for r in json.loads(out.stdout)["requests"]] == ["nosuch"]
    out = hippoctl(host, "audit", "--since", "soon")
    assert out.returncode == 1 and out.stderr.startswith("Error: since:")


def test_each_app_has_its_own_metrics(tmp_path):
    """Two apps in one process (as in tests) must not share or collide on collectors."""
    stores, apps = [], []
    try:
        for name in ("a", "b"):
            settings = load_settings({"home": str(tmp_path / name)}, environ={})
            settings.ensure_dirs()
            store = Store(settings.db_path)
            stores.append(store)
            registry = Registry(settings, store)
            apps.append(build_app(settings, store, registry, Scheduler(settings, store, registry, name)))
        a, b = (app["metrics"] for app in apps)
        a.requests.labels("/x", "GET", "200").inc()
        assert a.registry is not b.registry
        assert a.registry.get_sample_value("hippo_http_requests_total", {"route": "/x", "method": "GET", "status": "200"}) == 1
        assert b.registry.get_sample_value("hippo_http_requests_total", {"route": "/x", "method": "GET", "status": "200"}) is None
        assert b.registry.get_sample_value("hippo_build_info", {"version": "0.1.0", "node": "b"}) == 1
    finally:
        for store in stores:
            store.close()


def test_parts_that_are_off_answer_503_naming_them(tmp_path):
    """An app without the cluster, splits or drafts (as in tests) says which part is not running."""
    from aiohttp.test_utils import TestClient, TestServer

    settings = load_settings({"home": str(tmp_path / "off")}, environ={})
    settings.ensure_dirs()
    store = Store(settings.db_path)
    registry = Registry(settings, store)
    app = build_app(settings, store, registry, Scheduler(settings, store, registry, "off"))

    async def scenario():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for path, part in (("/api/hippo/nodes", "the cluster"), ("/api/hippo/placement", "splitting models"),
                               ("/api/hippo/audit?limit=0", None)):
                resp = await client.get(path)
                body = await resp.json()
                if part is None:
                    assert resp.status == 400 and body["error"] == "limit must be between 1 and 10000", body
                else:
                    assert resp.status == 503 and body["error"].startswith(part), body
                    assert body["error"].endswith("is not running on this node"), body

    try:
        asyncio.run(scenario())
    finally:
        store.close()
