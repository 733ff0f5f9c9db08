"""Builds the aiohttp application: middleware, routes, and the shared objects handlers use."""

from __future__ import annotations

from aiohttp import web

from hippod.api import admin, ollama, openai
from hippod.api import cluster as cluster_routes, peer  # cluster (issue 5)
from hippod.api.errors import error_middleware
from hippod.config import Settings
from hippod.registry.registry import Registry
from hippod.scheduler import Scheduler
from hippod.store.database import Store


def build_app(settings: Settings, store: Store, registry: Registry, scheduler: Scheduler) -> web.Application:
    app = web.Application(middlewares=[error_middleware, peer.peer_auth_middleware],  # peer: issue 5
                          client_max_size=settings.max_body_bytes)
    app["settings"] = settings
    app["store"] = store
    app["registry"] = registry
    app["scheduler"] = scheduler
    app.add_routes(ollama.routes)
    app.add_routes(admin.routes)
    app.add_routes(openai.routes)
    app.add_routes(peer.routes)  # cluster (issue 5)
    app.add_routes(cluster_routes.routes)  # cluster (issue 5)
    return app
