"""Routes of models split across nodes.

Peer side, under /api/hippo/peer/split/ (signed with the cluster secret, like every peer route):
budget, prepare, start, ping and stop of the layers this node runs for a coordinator.
User side: /api/hippo/placement pins a model to a list of nodes (`hippoctl run --nodes`).
"""

from __future__ import annotations

from aiohttp import web

from hippod.api.errors import BadRequest, read_json, running
from hippod.api.fields import get
from hippod.protocol import SplitPrepare, SplitRecordError, SplitRef, SplitStart, decode_split

routes = web.RouteTableDef()


def _splits(request: web.Request):
    return running(request, "splits", "splitting models across nodes")


# -- peer side --------------------------------------------------------------------------------


@routes.post("/api/hippo/peer/split/budget")
async def budget(request: web.Request) -> web.Response:
    return web.json_response(_splits(request).budget())


def _record(cls, body):
    """Every split message is checked here, by the record's own rules."""
    try:
        return decode_split(cls, body)
    except SplitRecordError as e:
        raise BadRequest(str(e), param=e.param) from None


def _address(value: str | None) -> str:
    text = (value or "127.0.0.1").split("%")[0]
    return text[7:] if text.startswith("::ffff:") else text


@routes.post("/api/hippo/peer/split/prepare")
async def prepare(request: web.Request) -> web.Response:
    record = _record(SplitPrepare, await read_json(request))
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    local = _address(str(sock[0]) if sock else None)
    remote = _address(request.remote)
    return web.json_response(await _splits(request).prepare(request["peer"], record, local, remote))


@routes.post("/api/hippo/peer/split/start")
async def start(request: web.Request) -> web.Response:
    record = _record(SplitStart, await read_json(request))
    return web.json_response(await _splits(request).start_hosted(request["peer"], record))


@routes.post("/api/hippo/peer/split/ping")
async def ping(request: web.Request) -> web.Response:
    record = _record(SplitRef, await read_json(request))
    return web.json_response(_splits(request).ping(request["peer"], record.split))


@routes.post("/api/hippo/peer/split/stop")
async def stop(request: web.Request) -> web.Response:
    record = _record(SplitRef, await read_json(request))
    return web.json_response({"stopped": await _splits(request).stop_hosted(request["peer"], record.split)})


# -- user side --------------------------------------------------------------------------------


@routes.get("/api/hippo/placement")
async def placements(request: web.Request) -> web.Response:
    return web.json_response({"placements": _splits(request).placements.nodes})


@routes.post("/api/hippo/placement")
async def set_placement(request: web.Request) -> web.Response:
    """{"model": NAME, "nodes": ["alpha", "beta"]} pins the model's layers to those nodes (this
    node always takes the first layers); "nodes": null or [] lets the scheduler decide again.
    A loaded model placed otherwise is unloaded (once idle) so the next request follows it."""
    body = await read_json(request)
    name = get(body, "model", str, required=True)
    nodes = get(body, "nodes", list)
    if nodes is not None and not all(isinstance(n, str) and n for n in nodes):
        raise BadRequest("nodes must be a list of node names", param="nodes")
    splits = _splits(request)
    rec = request.app["registry"].get(name)
    splits.placements.set(rec.name, nodes or None)
    scheduler = request.app["scheduler"]
    loaded = scheduler.loaded.get(rec.name)
    if loaded is not None:
        current = [s["node"] for s in loaded.runner.placement or []]
        wanted = splits.forced(rec.name)
        if (wanted or []) != current[1:]:
            await scheduler.stop(rec.name)
    return web.json_response({"model": rec.name, "nodes": splits.placements.get(rec.name)})
