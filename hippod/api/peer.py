"""Peer-to-peer endpoints under /api/hippo/peer/: hello, a model's manifest, blob downloads.

Every request under that prefix, whether or not a route exists for it, must carry a valid
HMAC signature made with the cluster secret (see hippod.cluster.trust); anything else gets 403
before any handler runs. JSON answers are signed back, bound to the request's nonce.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from aiohttp import web

from hippod.api.errors import BadRequest, error_middleware, error_response, read_json
from hippod.cluster import trust
from hippod.cluster.peers import NodeInfo

log = logging.getLogger("hippo.api.peer")
PREFIX = "/api/hippo/peer/"

routes = web.RouteTableDef()


def is_peer_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")


@web.middleware
async def peer_auth_middleware(request: web.Request, handler):
    """403 for any unsigned or badly signed peer request; signs the JSON answers of good ones."""
    if not is_peer_path(request.path):
        return await handler(request)
    cluster = request.app.get("cluster")
    if cluster is None:
        return error_response(request, 403, "forbidden: this node takes no peer requests")
    body = await request.read()
    try:
        request["peer"] = cluster.keyring.verify(request.method, request.raw_path, body, request.headers)
    except trust.TrustError as e:
        log.debug("refused peer request %s %s from %s: %s", request.method, request.path, request.remote, e)
        return error_response(request, 403, f"forbidden: {e}")
    resp = await error_middleware(request, handler)  # errors too go out signed
    if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        signature = cluster.keyring.sign_response(request.headers[trust.H_NONCE], resp.status, resp.body)
        if signature:
            resp.headers[trust.H_SIGNATURE] = signature
    return resp


@routes.post("/api/hippo/peer/hello")
async def hello(request: web.Request) -> web.Response:
    try:
        info = NodeInfo.from_dict(await read_json(request))  # read_json: deep or non-UTF-8 JSON is a 400
    except ValueError as e:
        raise BadRequest(f"hello: {e}") from None
    cluster = request.app["cluster"]
    try:
        reply = cluster.receive_hello(request["peer"], info, request.remote)
    except trust.TrustError as e:
        raise BadRequest(str(e), status=403) from None
    return web.json_response(asdict(reply))


@routes.get("/api/hippo/peer/manifest")
async def manifest(request: web.Request) -> web.Response:
    name = request.query.get("model")
    if not name:
        raise BadRequest("model is required", param="model")
    rec = request.app["registry"].get(name)
    if rec.missing:
        raise BadRequest(f"model '{rec.name}' has missing files here", status=404)
    return web.json_response({"name": rec.name, "digest": rec.digest, "format": rec.format,
                              "source": rec.source, "files": rec.files, "size": rec.size,
                              "details": rec.details})


@routes.get(r"/api/hippo/peer/blobs/sha256-{sha256:[0-9a-f]{64}}")
async def blob(request: web.Request) -> web.StreamResponse:
    """A blob of one of our models; Range requests are answered 206 (resume)."""
    sha256 = request.match_info["sha256"]
    registry = request.app["registry"]
    path = registry.blob_path(sha256)
    if registry.store.get_blob(sha256) is None or not path.is_file():
        raise BadRequest(f"no blob sha256-{sha256} here", status=404)
    # sendfile(2) where the platform has it; 4 MB reads where it does not.
    return web.FileResponse(path, chunk_size=4 << 20, headers={"Content-Type": "application/octet-stream"})
