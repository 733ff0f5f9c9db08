"""Builds the aiohttp application: middleware, routes, and the shared objects handlers use."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from aiohttp import web

from hippod import audit  # operations (issue 8)
from hippod.api import admin, blobs, info, ollama, openai, responses, ui
from hippod.api import cluster as cluster_routes, peer  # cluster (issue 5)
from hippod.api import forward as forward_routes
from hippod.api import remote_drafts as remote_draft_routes
from hippod.api import splits as split_routes  # pipeline split (issue 6)
from hippod.api import auth, metrics  # operations (issue 8)
from hippod.api.errors import error_middleware, last_resort_middleware
from hippod.config import Settings
from hippod.registry.registry import Registry
from hippod.scheduler import Scheduler
from hippod.store.database import Store


def build_app(settings: Settings, store: Store, registry: Registry, scheduler: Scheduler) -> web.Application:
    # Outermost first. Anything a middleware raises is a generic 500; metrics count every
    # answer, 401/403 included; a foreign Host (DNS rebinding) is refused before anything looks
    # at the request; CORS refuses foreign origins and answers preflights before the key is asked
    # for; the audit row carries the final status; the key is checked inside error_middleware,
    # before any handler; peer requests are authenticated before their bodies are read.
    app = web.Application(middlewares=[last_resort_middleware, metrics.metrics_middleware,
                                       auth.host_middleware, auth.draining_middleware,
                                       auth.cors_middleware, audit.audit_middleware, error_middleware,
                                       auth.auth_middleware, peer.peer_auth_middleware],  # peer: issue 5
                          client_max_size=settings.max_body_bytes)
    app["settings"] = settings
    app["allowed_hosts"] = auth.machine_names(settings)
    app["peer_reads"] = asyncio.Semaphore(peer.PEER_READS)
    app["store"] = store
    app["audit"] = audit.Writer(store)
    app.on_cleanup.append(audit.flush_on_cleanup)  # after the last handler's row
    app["registry"] = registry
    app["scheduler"] = scheduler
    app["inflight"] = metrics.InFlight()  # operations (issue 8): shutdown drains these
    app["metrics"] = metrics.Metrics(app)
    app["started_at"] = datetime.now(timezone.utc)
    app.on_response_prepare.append(auth.add_cors_headers)
    app.add_routes(ollama.routes)
    app.add_routes(blobs.routes)  # Ollama's blob upload, for create with `files`
    app.add_routes(admin.routes)
    app.add_routes(info.routes)  # GET /api/hippo/info
    app.add_routes(ui.routes)  # GET /ui, the chat page
    app.add_routes(openai.routes)
    app.add_routes(responses.routes)
    app.add_routes(peer.routes)  # cluster (issue 5)
    app.add_routes(cluster_routes.routes)  # cluster (issue 5)
    app.add_routes(split_routes.routes)  # pipeline split (issue 6)
    app.add_routes(remote_draft_routes.routes)  # a model's draft on a peer
    app.add_routes(forward_routes.routes)  # a peer's request for a model only we can run
    app.add_routes(metrics.routes)  # operations (issue 8): /metrics, /api/hippo/audit
    return app
