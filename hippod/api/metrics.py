"""What hippod reports about itself: GET /metrics (Prometheus) and GET /api/hippo/audit.

Each app has its own CollectorRegistry, so several apps in one process (tests) never share or
collide on counters. Request counts and latencies are taken by one middleware; token counts and
timings come from the audit trace of inference requests (hippod.audit); what is loaded, memory
and peers are read at scrape time, so they can never drift from the scheduler's own state.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily

from hippod import __version__
from hippod.api.errors import BadRequest
from hippod.api.fields import query_limit
from hippod.api.ollama_types import iso

# The *_created series double every counter's lines and say nothing an operator needs; this is a
# process-wide switch of prometheus_client, and hippod is the only user of it in its process.
disable_created_metrics()

routes = web.RouteTableDef()

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class InFlight:
    """Requests being handled now; shutdown sets `draining` and waits for this to reach zero."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False  # SIGTERM came: new requests get 503 (auth.draining_middleware)
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return self.count == 0


class _Live:
    """A collector whose values are read from the app at scrape time."""

    def __init__(self, app: web.Application, inflight: InFlight):
        self.app = app
        self.inflight = inflight

    def describe(self):
        return []  # names are fixed; skip the collect() at registration

    def collect(self):
        scheduler = self.app["scheduler"]
        info = GaugeMetricFamily("hippo_build_info", "hippod version and node", labels=["version", "node"])
        info.add_metric([__version__, str(scheduler.node)], 1)
        yield info
        loaded = list(scheduler.loaded.values())
        yield GaugeMetricFamily("hippo_loaded_models", "models loaded in runners", value=len(loaded))
        size = GaugeMetricFamily("hippo_model_memory_bytes", "memory counted for a loaded model", labels=["model"])
        busy = GaugeMetricFamily("hippo_model_active_requests", "requests a loaded model is serving",
                                 labels=["model"])
        for m in loaded:
            size.add_metric([m.name], m.size)
            busy.add_metric([m.name], m.refs)
        yield size
        yield busy
        yield GaugeMetricFamily("hippo_memory_budget_bytes", "bytes models may use", value=scheduler.budget())
        yield GaugeMetricFamily("hippo_memory_used_bytes", "bytes loaded models use", value=scheduler.used())
        yield GaugeMetricFamily("hippo_pending_requests", "requests holding or waiting for a model",
                                value=scheduler.pending)
        yield GaugeMetricFamily("hippo_http_requests_in_flight", "HTTP requests being handled",
                                value=self.inflight.count)
        peers = GaugeMetricFamily("hippo_peers", "peers known, by state", labels=["state"])
        for state, n in peer_counts(self.app).items():
            peers.add_metric([state], n)
        yield peers


def peer_counts(app: web.Application) -> dict[str, int]:
    counts = {"trusted": 0, "untrusted": 0, "stale": 0}
    cluster = app.get("cluster")
    for p in app["store"].list_peers():
        if cluster is not None and cluster.peers.is_stale(p):
            counts["stale"] += 1
        else:
            counts["trusted" if p.trusted else "untrusted"] += 1
    return counts


class Metrics:
    def __init__(self, app: web.Application):
        self.registry = CollectorRegistry()
        self.inflight: InFlight = app["inflight"]
        r = self.registry
        self.requests = Counter("hippo_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("hippo_http_request_duration_seconds", "time to answer (streams: to the end)",
                                  ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hippo_prompt_tokens", "tokens read (prompt)", ["model"], registry=r)
        self.completion_tokens = Counter("hippo_completion_tokens", "tokens generated", ["model"], registry=r)
        self.drafted = Counter("hippo_speculative_drafted_tokens", "tokens a draft proposed (speculative decoding)",
                               ["model"], registry=r)
        self.accepted = Counter("hippo_speculative_accepted_tokens", "drafted tokens the target kept",
                                ["model"], registry=r)
        self.ttft = Histogram("hippo_time_to_first_token_seconds",
                              "request arrival to the model's first token (includes loading)",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("hippo_time_per_output_token_seconds",
                                   "decode time per generated token, one observation per request",
                                   ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.load = Histogram("hippo_model_load_seconds", "time requests waited for a model to load",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        r.register(_Live(app, self.inflight))

    def observe(self, route: str, method: str, status: int, seconds: float, trace) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route).observe(seconds)
        if trace is None or not trace.model:
            return
        model = trace.model
        if trace.prompt_tokens:
            self.prompt_tokens.labels(model).inc(trace.prompt_tokens)
        if trace.completion_tokens:
            self.completion_tokens.labels(model).inc(trace.completion_tokens)
            if trace.eval_seconds > 0:
                self.per_token.labels(model).observe(trace.eval_seconds / trace.completion_tokens)
        if trace.drafted_tokens:
            self.drafted.labels(model).inc(trace.drafted_tokens)
            self.accepted.labels(model).inc(trace.accepted_tokens)
        if trace.ttft_seconds is not None and trace.completion_tokens:
            self.ttft.labels(model).observe(trace.ttft_seconds)
        if trace.load_seconds > 0:
            self.load.labels(model).observe(trace.load_seconds)


def route_label(request: web.Request) -> str:
    """The route's pattern, not the path: bounded label values (/v1/models/{model})."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    metrics: Metrics = request.app["metrics"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status = 500
    metrics.inflight.enter()
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        metrics.inflight.leave()
        metrics.observe(route_label(request), request.method, status, loop.time() - t0,
                        request.get("trace"))


@routes.get("/metrics")
async def metrics_route(request: web.Request) -> web.Response:
    # The format the scraper asks for (Prometheus 2 and 3 differ; OpenMetrics on request).
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app["metrics"].registry), headers={"Content-Type": content_type})


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'15m', '2h', '7d' (ago) or an ISO 8601 time; naive times are UTC."""
    text = text.strip()
    m = _AGO.match(text)
    if m:
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2)])
        except OverflowError:  # '99999999999d' ago is before year 1
            raise BadRequest(f"since: {text!r} reaches back too far", param="since") from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"since: {text!r} is neither a duration (15m, 2h, 7d) nor an ISO 8601 time",
                         param="since") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@routes.get("/api/hippo/audit")
async def audit_route(request: web.Request) -> web.Response:
    """The audit log, newest first: ?since=1h|ISO&limit=N."""
    limit = query_limit(request.query, 100, 10000)
    since = parse_since(request.query["since"]) if request.query.get("since") else None
    await request.app["audit"].flush()  # the requests that have ended are in it
    rows = await asyncio.to_thread(request.app["store"].recent_requests, limit, since)
    return web.json_response({"requests": [
        {"id": r.id, "time": iso(r.time), "client": r.client, "route": r.endpoint, "model": r.model,
         "status": r.status, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
         "total_seconds": r.total_seconds, "ttft_seconds": r.ttft_seconds, "error": r.error,
         "prompt": r.prompt, "model_source": r.model_source} for r in rows]})
