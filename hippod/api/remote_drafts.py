"""Routes of drafting on a peer.

Peer side, under /api/hippo/peer/draft/ (signed with the cluster secret, like every peer route):
open, ping and close of a draft session this node runs for a peer's target.
User side: /api/hippo/draft-on names the node a model's draft runs on (`hippoctl run --draft-on`).
"""

from __future__ import annotations

from aiohttp import web

from hippod.api.errors import BadRequest, read_json, running
from hippod.api.fields import get
from hippod.api.splits import _address
from hippod.cluster.remote_drafts import DraftHostError

routes = web.RouteTableDef()


def _drafts(request: web.Request):
    return running(request, "remote_drafts", "drafting on peers")


async def _body(request: web.Request) -> dict:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body


def _answer(call):
    try:
        return web.json_response(call())
    except DraftHostError as e:
        raise BadRequest(str(e), status=e.status) from None


@routes.post("/api/hippo/peer/draft/open")
async def open_session(request: web.Request) -> web.Response:
    body = await _body(request)
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    local = _address(str(sock[0]) if sock else None)
    try:
        return web.json_response(await _drafts(request).open(request["peer"], body, local, request.remote))
    except DraftHostError as e:
        raise BadRequest(str(e), status=e.status) from None


@routes.post("/api/hippo/peer/draft/ping")
async def ping(request: web.Request) -> web.Response:
    body = await _body(request)
    return _answer(lambda: _drafts(request).ping(request["peer"], body))


@routes.post("/api/hippo/peer/draft/close")
async def close(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        return web.json_response(await _drafts(request).close(request["peer"], body))
    except DraftHostError as e:
        raise BadRequest(str(e), status=e.status) from None


@routes.get("/api/hippo/draft-on")
async def draft_placements(request: web.Request) -> web.Response:
    return web.json_response({"draft_on": {k: v[0] for k, v in _drafts(request).placements.nodes.items()}})


@routes.post("/api/hippo/draft-on")
async def set_draft_on(request: web.Request) -> web.Response:
    """{"model": NAME, "node": "beta"} runs the model's draft on that trusted peer from its next
    load; "node": null drafts here again. A loaded model is unloaded (once idle) to follow it."""
    body = await _body(request)
    name = get(body, "model", str, required=True)
    node = get(body, "node", str)
    try:
        name, node = await _drafts(request).follow(name, node)
    except DraftHostError as e:
        raise BadRequest(str(e), status=e.status, param="node" if e.status == 404 else "model") from None
    return web.json_response({"model": name, "draft_on": node})
