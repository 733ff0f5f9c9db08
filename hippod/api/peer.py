"""Peer-to-peer endpoints under /api/hippo/peer/: hello, a model's manifest, blob downloads.

Every request under that prefix, whether or not a route exists for it, must carry a valid
HMAC signature made with the cluster secret (see hippod.cluster.trust); anything else gets 403
before any handler runs. JSON answers are signed back, bound to the request's nonce.

The signature covers the headers and the body's hash, which the headers declare, so the sender
is authenticated before a byte of the body is read: a stranger gets 403 unread (no secret here,
a missing header, another addressee, a stale or pre-start time, a signature that does not match,
a nonce already used), and can neither hold a reading slot nor make us wait on a body. Then the
declared size is checked (413 unread), and only then is the body read: at most PEER_MAX_BODY
bytes (FORWARD_MAX_BODY for a forwarded client request, which may hold a long chat or many
texts to embed), by at most PEER_READS requests at a time, within PEER_READ_TIMEOUT; a body
that does not hash to the signed value is refused (403).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import asdict

from aiohttp import web

from hippod.api.errors import BadRequest, error_middleware, error_response, read_json
from hippod.cluster import trust
from hippod.cluster.peers import NodeInfo
from hippod.protocol import FORWARD_EMBED_PATH, FORWARD_PATH

log = logging.getLogger("hippo.api.peer")
PREFIX = "/api/hippo/peer/"
PEER_MAX_BODY = 1 << 20  # the largest peer message (a hello listing many models) is far smaller
FORWARD_MAX_BODY = 4 << 20  # a forwarded client request (long chats): 16 reads hold <= 64 MiB
PEER_READS = 16  # bodies of authenticated peers read at once
PEER_READ_TIMEOUT = 30.0  # seconds a body may take to arrive
PEER_SLOT_WAIT = 10.0  # seconds a request waits for a reading slot before a 503
BYTE_RANGE = re.compile(r"bytes=(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))")  # one range, as copies ask

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
    try:
        peer = cluster.keyring.authenticate(request.method, request.raw_path, request.headers)
    except trust.TrustError as e:
        return _refused(request, e)
    cap = FORWARD_MAX_BODY if request.path in (FORWARD_PATH, FORWARD_EMBED_PATH) else PEER_MAX_BODY
    limit = min(cap, request.app["settings"].max_body_bytes)
    if request.content_length is not None and request.content_length > limit:
        return _too_large(request, limit)
    request, body = await _read_capped(request, limit)
    if isinstance(body, web.Response):
        return body
    try:
        cluster.keyring.check_body(body, request.headers)
    except trust.TrustError as e:
        return _refused(request, e)
    request["peer"] = peer
    resp = await error_middleware(request, handler)  # errors too go out signed
    if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        signature = cluster.keyring.sign_response(request.headers[trust.H_NONCE], resp.status, resp.body)
        if signature:
            resp.headers[trust.H_SIGNATURE] = signature
    return resp


def _refused(request: web.Request, e: trust.TrustError) -> web.Response:
    log.debug("refused peer request %s %s from %s: %s", request.method, request.path, request.remote, e)
    resp = error_response(request, 403, f"forbidden: {e}")
    if request.body_exists:
        resp.force_close()  # a body we will not read: drop the connection rather than drain it
    return resp


def _too_large(request: web.Request, limit: int) -> web.Response:
    resp = error_response(request, 413, f"peer request body too large (limit {limit} bytes)")
    resp.force_close()  # the rest of the body is never read
    return resp


async def _read_capped(request: web.Request, limit: int) -> tuple[web.Request, bytes | web.Response]:
    """(the request to hand on, its body) with the peer limits; an error answer instead of the
    body when a limit is hit. The clone carries the smaller size cap and caches the body."""
    if not request.body_exists:  # a GET (blob, manifest): nothing to hold in memory
        return request, b""
    slots: asyncio.Semaphore = request.app["peer_reads"]
    try:
        await asyncio.wait_for(slots.acquire(), PEER_SLOT_WAIT)
    except asyncio.TimeoutError:
        return request, error_response(request, 503, "too many peer requests at once; try again")
    try:
        capped = request.clone(client_max_size=limit)
        return capped, await asyncio.wait_for(capped.read(), PEER_READ_TIMEOUT)
    except web.HTTPRequestEntityTooLarge:
        return request, _too_large(request, limit)
    except asyncio.TimeoutError:
        resp = error_response(request, 408, f"peer request body did not arrive within {PEER_READ_TIMEOUT:.0f}s")
        resp.force_close()
        return request, resp
    finally:
        slots.release()


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
    wanted = request.headers.get("Range")
    if wanted is not None and not _satisfiable(wanted, path.stat().st_size):
        resp = error_response(request, 416, f"range {wanted[:80]!r} is not one satisfiable byte range")
        resp.headers["Content-Range"] = f"bytes */{path.stat().st_size}"
        return resp
    # sendfile(2) where the platform has it; 4 MB reads where it does not.
    return web.FileResponse(path, chunk_size=4 << 20, headers={"Content-Type": "application/octet-stream"})


def _satisfiable(header: str, size: int) -> bool:
    """One byte range that overlaps the blob (what aiohttp would otherwise take loosely: "-0"
    is not the whole file)."""
    m = BYTE_RANGE.fullmatch(header)
    if m is None:
        return False
    if m[3] is not None:
        return int(m[3]) > 0 and size > 0
    start = int(m[1])
    return start < size and (not m[2] or int(m[2]) >= start)
