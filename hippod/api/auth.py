"""Who may talk to hippod: the API key, browser origins (CORS), and no new work while draining.

With an API key set, every route wants `Authorization: Bearer <key>` (what the OpenAI clients
send, and what Ollama clients send given a header). Peer requests carry the cluster's HMAC
signature instead of the key; they pass here and are checked by peer.peer_auth_middleware.

Browsers are the other risk: any web page can POST to localhost. A request whose Origin is not
allowed is refused with 403 before any handler runs; allowed origins get CORS headers, and their
preflights are answered here (preflights never carry credentials, so they come before the key).
"""

from __future__ import annotations

import hmac
import re
from functools import lru_cache

from aiohttp import web

from hippod.api.errors import error_response
from hippod.api import ui
from hippod.api.peer import is_peer_path
from hippod.cluster.trust import H_SIGNATURE

# Ollama's default: pages served from this machine, on any port.
LOCAL_ORIGINS = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                      for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*"))
ALLOW_METHODS = "GET, POST, PUT, DELETE, HEAD, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Organization, " \
                "OpenAI-Project, X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, " \
                "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count"


@lru_cache(maxsize=64)
def _pattern(glob: str) -> re.Pattern:
    """'http://localhost:*' -> a regex; '*' matches any run of characters, nothing else is special."""
    return re.compile("".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", glob)) + r"\Z",
                      re.IGNORECASE)


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Configured origins add to the local ones, as OLLAMA_ORIGINS does; '*' allows any."""
    patterns = (*allowed, *LOCAL_ORIGINS)
    return any(_pattern(p.rstrip("/")).match(origin) for p in patterns)


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """403 for a disallowed Origin; answers preflights. Headers are added in `add_cors_headers`."""
    origin = request.headers.get("Origin")
    if not origin:  # not a browser's cross-origin call: nothing to do
        return await handler(request)
    if not origin_allowed(origin, request.app["settings"].origins):
        return error_response(request, 403, f"origin {origin} is not allowed (set HIPPO_ORIGINS)")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers")
            or ALLOW_HEADERS, "Access-Control-Max-Age": "600"})
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs as any answer (streams too) sends its headers."""
    origin = request.headers.get("Origin")
    if origin and origin_allowed(origin, request.app["settings"].origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "Content-Type, Content-Length, WWW-Authenticate"


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """401 without the right bearer token, on every route, when an API key is set."""
    key = request.app["settings"].api_key
    if not key:
        return await handler(request)
    if is_peer_path(request.path) and H_SIGNATURE in request.headers:
        return await handler(request)  # signed by a peer: peer_auth_middleware judges it
    if request.method in ("GET", "HEAD") and request.path in ui.PATHS:
        return await handler(request)  # the static chat page; it asks for the key itself
    token = _bearer(request)
    if token is None or not hmac.compare_digest(token.encode(), key.encode()):
        why = "missing" if token is None else "wrong"
        resp = error_response(request, 401, f"unauthorized: {why} API key; send 'Authorization: Bearer <key>'")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="hippo"'
        return resp
    return await handler(request)


@web.middleware
async def draining_middleware(request: web.Request, handler):
    """After SIGTERM the listener is closed, but kept-alive connections may still ask: refuse."""
    if request.app["inflight"].draining:
        resp = error_response(request, 503, "hippod is shutting down")
        resp.force_close()
        return resp
    return await handler(request)
