"""hippo's own routes under /api/hippo/: load history and the node's status."""

from __future__ import annotations

from aiohttp import web

from hippod import __version__
from hippod.api.fields import query_limit
from hippod.api.ollama_types import iso

routes = web.RouteTableDef()


@routes.get("/api/hippo/loads")
async def loads(request: web.Request) -> web.Response:
    limit = query_limit(request.query, 20, 1000)
    rows = request.app["store"].recent_loads(limit)
    return web.json_response({"loads": [
        {"id": r.id, "model": r.model, "node": r.node, "started_at": iso(r.started_at),
         "ended_at": iso(r.ended_at), "reason": r.reason, "end_reason": r.end_reason,
         "load_seconds": r.load_seconds, "bytes": r.bytes, "pid": r.pid, "layers": r.layers}
        for r in rows]})


@routes.get("/api/hippo/status")
async def status(request: web.Request) -> web.Response:
    scheduler = request.app["scheduler"]
    return web.json_response({
        "version": __version__, "node": scheduler.node, "memory_budget": scheduler.budget(),
        "memory_used": scheduler.used(), "guard": request.app["settings"].guard,
        "loaded": sorted(scheduler.loaded), "pending_requests": scheduler.pending,
        "spare": scheduler.spares.status()})
