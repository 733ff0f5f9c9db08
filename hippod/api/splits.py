"""Routes of models split across nodes (issue 6).

Peer side, under /api/hippo/peer/split/ (signed with the cluster secret, like every peer route):
budget, prepare, start, ping and stop of the layers this node runs for a coordinator.
User side: /api/hippo/placement pins a model to a list of nodes (`hippoctl run --nodes`).
"""

from __future__ import annotations

from aiohttp import web

from hippod import paths
from hippod.api.errors import BadRequest, read_json
from hippod.api.fields import get, number_in

routes = web.RouteTableDef()


def _splits(request: web.Request):
    splits = request.app.get("splits")
    if splits is None:
        raise BadRequest("splitting models across nodes is not running on this node", status=503)
    return splits


# -- peer side --------------------------------------------------------------------------------


@routes.post("/api/hippo/peer/split/budget")
async def budget(request: web.Request) -> web.Response:
    return web.json_response(_splits(request).budget())


@routes.post("/api/hippo/peer/split/prepare")
async def prepare(request: web.Request) -> web.Response:
    body = await read_json(request)
    for key in ("split", "model", "digest", "layers", "rank", "world", "bytes"):
        if body.get(key) is None:
            raise BadRequest(f"{key} is required", param=key)
    layers = body["layers"]
    if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)
            and 0 <= layers[0] < layers[1]):
        raise BadRequest("layers must be [start, end] with start < end", param="layers")
    for key in ("split", "model", "digest"):
        get(body, key, str, required=True)
    paths.check_token(body["split"], "split"), paths.check_sha256(body["digest"])  # they become file names
    for key in ("rank", "world", "bytes"):  # splits.prepare converts them: a list or 1e400 was a 500
        number_in(get(body, key, int, required=True), key, 0, 2**62)
    if get(body, "context_length", int) is not None:
        number_in(body["context_length"], "context_length", 1, 2**24)
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    local = str(sock[0]).split("%")[0] if sock else "127.0.0.1"
    remote = (request.remote or "127.0.0.1").split("%")[0]
    if remote.startswith("::ffff:"):
        remote = remote[7:]
    if local.startswith("::ffff:"):
        local = local[7:]
    return web.json_response(await _splits(request).prepare(request["peer"], body, local, remote))


@routes.post("/api/hippo/peer/split/start")
async def start(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await _splits(request).start_hosted(request["peer"], body))


@routes.post("/api/hippo/peer/split/ping")
async def ping(request: web.Request) -> web.Response:
    body = await read_json(request)
    split = get(body, "split", str, required=True)
    return web.json_response(_splits(request).ping(request["peer"], split))


@routes.post("/api/hippo/peer/split/stop")
async def stop(request: web.Request) -> web.Response:
    body = await read_json(request)
    split = get(body, "split", str, required=True)
    return web.json_response({"stopped": await _splits(request).stop_hosted(request["peer"], split)})


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
        current = [s["node"] for s in getattr(loaded.runner, "split", None) or []]
        wanted = splits.forced(rec.name)
        if (wanted or []) != current[1:]:
            await scheduler.stop(rec.name)
    return web.json_response({"model": rec.name, "nodes": splits.placements.get(rec.name)})
