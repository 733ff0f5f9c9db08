"""Who may talk to hippod: the API key, browser origins (CORS), and no new work while draining.

With an API key set, every route wants `Authorization: Bearer <key>` (what the OpenAI clients
send, and what Ollama clients send given a header). Peer requests carry the cluster's HMAC
signature instead of the key; they pass here and are checked by peer.peer_auth_middleware.

Browsers are the other risk: any web page can POST to localhost. A request whose Origin is not
allowed is refused with 403 before any handler runs; allowed origins get CORS headers, and their
preflights are answered here (preflights never carry credentials, so they come before the key).
A page can also rebind its own DNS name to 127.0.0.1 and read answers as same-origin: the Host
check refuses any name this daemon was not told it has (as Ollama does).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
import time
from functools import lru_cache

import psutil

from aiohttp import web

from hippod.api.errors import error_response
from hippod.api import ui
from hippod.api.peer import is_peer_path
from hippod.cluster.trust import H_SIGNATURE
from hippod.config import Settings, is_loopback

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
    if not (same_origin(request, origin) or origin_allowed(origin, request.app["settings"].origins)):
        return error_response(request, 403, f"origin {origin} is not allowed (set HIPPO_ORIGINS)")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers")
            or ALLOW_HEADERS, "Access-Control-Max-Age": "600"})
    return await handler(request)


def same_origin(request: web.Request, origin: str) -> bool:
    """A page hippod served itself (the chat page at /ui, opened by a name host_middleware
    allowed): its Origin is this request's own scheme and Host."""
    host = request.headers.get("Host", "")
    return bool(host) and origin.lower() == f"{request.scheme}://{host}".lower()


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs as any answer (streams too) sends its headers."""
    origin = request.headers.get("Origin")
    if origin and origin_allowed(origin, request.app["settings"].origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "Content-Type, Content-Length, WWW-Authenticate"


# -- DNS rebinding: the Host header -------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ADDRESS_TTL = 5.0  # seconds the machine's address list is reused (DHCP may change it)
_addresses: tuple[float, frozenset[str]] = (float("-inf"), frozenset())


def machine_names(settings: Settings) -> frozenset[str]:
    """The names this daemon may be called by, lowercased: loopback names always; when bound
    beyond loopback also the bound address, the host and node names (and their .local forms);
    plus HIPPO_ALLOWED_HOSTS."""
    names = set(LOOPBACK_NAMES)
    names.update(h.strip().lower().rstrip(".") for h in settings.allowed_hosts if h.strip())
    if not is_loopback(settings.host):
        hostname = socket.gethostname().lower().rstrip(".")
        for name in (settings.host, hostname, hostname.split(".")[0], settings.node_name or ""):
            name = name.lower().rstrip(".")
            if name:
                names.update((name, name if name.endswith(".local") else f"{name}.local"))
    return frozenset(names)


def _local_addresses() -> frozenset[str]:
    global _addresses
    at, found = _addresses
    if time.monotonic() - at > _ADDRESS_TTL:
        found = frozenset(a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values()
                          for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
        _addresses = (time.monotonic(), found)
    return found


def host_name(header: str) -> str | None:
    """'Box.local:11434' -> 'box.local'; '[::1]:80' -> '::1'; None for what is not a host."""
    text = header.strip().lower()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        return host
    host, _, port = text.partition(":")
    if port and not port.isdigit():
        return None
    host = host.rstrip(".")
    return host if re.fullmatch(r"[a-z0-9_.-]{1,253}", host) else None


def host_allowed(header: str, settings: Settings, names: frozenset[str]) -> bool:
    """An IP literal cannot be a rebound name: allowed when it is loopback or (bound beyond
    loopback) one of this machine's addresses. A name must be one `machine_names` lists."""
    if "*" in names:
        return True
    host = host_name(header)
    if host is None:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host in names
    if ip.is_loopback or ip.is_unspecified or host in names:  # 0.0.0.0 reaches this machine too
        return True
    return not is_loopback(settings.host) and host in _local_addresses()


@web.middleware
async def host_middleware(request: web.Request, handler):
    """403 for a Host header naming someone else (a DNS-rebinding page), before anything else."""
    header = request.headers.get("Host")
    settings = request.app["settings"]
    if header is not None and not host_allowed(header, settings, request.app["allowed_hosts"]):
        shown = header[:100].encode("ascii", "backslashreplace").decode()
        return error_response(request, 403, f"host {shown!r} is not allowed: hippod answers only to the "
                              "names it is bound to (DNS rebinding protection); add the name to "
                              "HIPPO_ALLOWED_HOSTS if it is yours")
    return await handler(request)


def from_this_machine(request: web.Request) -> bool:
    """The request came from this machine: over loopback, or to and from the same address."""
    remote = (request.remote or "").split("%")[0]
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return ip.is_loopback or (bool(sock) and str(ip) == str(sock[0]).split("%")[0])


# -- the API key ------------------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same_secret(given: str, key: str) -> bool:
    """Constant-time; a header holding bytes that are not UTF-8 (aiohttp keeps them as
    surrogates) is simply a wrong key, not an error."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape"))


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
    if token is None or not _same_secret(token, key):
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
