"""One place that turns exceptions into the error shapes each API promises.

Handlers raise; this middleware answers `{"error": "..."}` (Ollama, admin) or
`{"error": {"message", "type", "param", "code"}}` (OpenAI, under /v1/). Never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re

from aiohttp import web

from hippod.paths import UnsafePath
from hippod.registry.registry import RegistryError
from hippod.runner_process import RunnerError
from hippod.scheduler import SchedulerError

log = logging.getLogger("hippo.api")


class BadRequest(Exception):
    """Invalid input; `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def running(request: web.Request, key: str, what: str):
    """A part of the daemon that may be off on this node (the cluster, splits, drafts for
    peers): the part, or a 503 that says which is not running."""
    part = request.app.get(key)
    if part is None:
        raise BadRequest(f"{what} is not running on this node", status=503)
    return part


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "server_busy", 507: "insufficient_memory"}


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """The OpenAI error object, the same whether it is an answer or an event inside a stream."""
    code = None if status < 500 else str(status)
    if status == 404 and "model" in message:
        code = "model_not_found"
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


INTERNAL_ERROR = "internal error (details are in hippod's log)"


def error_response(request: web.Request, status: int, message: str, param: str | None = None
                   ) -> web.Response:
    body = openai_error(status, message, param) if request.path.startswith("/v1/") else {"error": message}
    return web.json_response(body, status=status)


def status_and_message(exc: BaseException) -> tuple[int, str, str | None]:
    if isinstance(exc, BadRequest):
        return exc.status, str(exc), exc.param
    if isinstance(exc, (RegistryError, SchedulerError, RunnerError, UnsafePath)):
        return exc.status, str(exc), None
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # e.g. the store's StoreDiskFull
        return 507, f"disk full: {exc.strerror or exc}", None
    # A real fault. Its text may hold paths, SQL or secrets: the log gets it whole, the client not.
    log.error("unhandled error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return 500, INTERNAL_ERROR, None


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        limit = request.app["settings"].max_body_bytes
        if request.content_length is not None and request.content_length > limit \
                and not request.path.startswith("/api/blobs/"):  # model files: api/blobs.py
            # Refused up front, whether or not the route reads a body (aiohttp checks only on read).
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"{request.path} not found", 405: f"method {request.method} not allowed on {request.path}",
                   413: f"request body too large (limit {request.app['settings'].max_body_bytes} bytes)"
                   }.get(exc.status, exc.reason)
        return error_response(request, exc.status, message)
    except (BadRequest, RegistryError, SchedulerError, RunnerError, UnsafePath) as exc:
        status, message, param = status_and_message(exc)
        return error_response(request, status, message, param)
    except ConnectionError:
        # The client went away mid-stream; its generation was already cancelled on the way out.
        log.debug("client disconnected from %s %s", request.method, request.path)
        return web.Response(status=499)
    except Exception as exc:  # a real fault: logged whole by status_and_message, answered without it
        log.error("unhandled error on %s %s", request.method, request.path)
        status, message, _ = status_and_message(exc)
        return error_response(request, status, message)


@web.middleware
async def last_resort_middleware(request: web.Request, handler):
    """Outermost: whatever a middleware outside error_middleware raises becomes a generic 500 in
    the API's error shape (aiohttp's own 500 page would name the exception)."""
    try:
        return await handler(request)
    except (web.HTTPException, asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.error("unhandled error on %s %s (in a middleware)", request.method, request.path)
        status, message, _ = status_and_message(exc)
        return error_response(request, status, message)


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates (b"\xed\xa0\x80") through.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _has_lone_surrogate(body):  # "\ud800" is valid JSON but no text: tokenizers, SQLite and logs choke on it
        raise BadRequest("request body is not valid UTF-8: it holds an unpaired surrogate (\\ud800-\\udfff)")
    return body


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value) -> bool:
    """Any string (key or value) in a parsed JSON document with an unpaired surrogate; no recursion,
    since the document may be nested as deep as the parser allows."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False
