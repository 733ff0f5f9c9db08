"""Ollama's blob upload (HEAD/POST /api/blobs/:digest), which `create` with `files` relies on.

The body is streamed to a temporary file and hashed on the way; it lands in the blob store only
if it hashes to the digest in the path. The global body-size limit does not apply here (model
files are gigabytes); the disk does (a full disk is a 507 and leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

from aiohttp import web

from hippod.api.errors import BadRequest
from hippod.registry.registry import Registry

routes = web.RouteTableDef()
PATH = "/api/blobs/{digest}"
CHUNK = 4 * 2**20


def _digest(request: web.Request) -> str:
    digest = request.match_info["digest"]
    hexdigest = digest.removeprefix("sha256:").removeprefix("sha256-")
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest) \
            or hexdigest == digest:
        raise BadRequest(f"blob digest must be 'sha256:<64 lowercase hex>', not {digest[:80]!r}",
                         param="digest")
    return hexdigest


@routes.head(PATH)
async def blob_exists(request: web.Request) -> web.Response:
    registry: Registry = request.app["registry"]
    return web.Response(status=200 if registry.has_blob(_digest(request)) else 404)


@routes.post(PATH)
async def upload_blob(request: web.Request) -> web.Response:
    registry: Registry = request.app["registry"]
    sha256 = _digest(request)
    if registry.has_blob(sha256):
        await request.release()
        return web.Response(status=200)
    tmp = registry.tmp_dir / f"upload-{uuid.uuid4().hex}"
    h = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := await request.content.read(CHUNK):
                h.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        created = await asyncio.to_thread(registry.adopt_upload, tmp, sha256, h.hexdigest())
    finally:
        tmp.unlink(missing_ok=True)
    return web.Response(status=201 if created else 200)
