"""The peer side of forwarded requests: POST /api/hippo/peer/forward and /forward-embed.

Like every peer route they are reached only through peer.peer_auth_middleware: signed with the
cluster secret (else 403 before the body is read), the body size-capped. The work runs as one
of our own clients' would (our model defaults, our scheduler), but is never forwarded again;
its events go back as signed frames (cluster/frames.py), with a heartbeat whenever a second
passes without one (a load, a long prefill, a wait for a slot), so the forwarding node can tell
a busy peer from a lost one. An error that comes before the first frame is an ordinary signed
JSON answer with its status; after it, an error frame. When the link to the forwarding node is
cut, our frames go unacknowledged; after UNACKED_LIMIT the kernel drops the connection (Linux's
TCP_USER_TIMEOUT), the next write fails and the job is cancelled, instead of running on for
minutes into a dead socket while the forwarding node has long moved on.
"""

from __future__ import annotations

import contextlib
import socket
from typing import AsyncIterator

from aiohttp import web

from hippod import audit
from hippod.api.errors import BadRequest, read_json, status_and_message
from hippod.api.inference import Generation, embed
from hippod.api.request import parse_embed_inputs, parse_options, parse_think, parse_tools, parse_top_logprobs
from hippod.cluster import trust
from hippod.cluster.frames import ANSWER_ENDS, FrameSigner, with_heartbeats
from hippod.protocol import (FORWARD_EMBED_PATH, FORWARD_PATH, ErrorEvent, ForwardStart, SplitRecordError,
                             decode_forward, decode_forward_embed)

routes = web.RouteTableDef()
UNACKED_LIMIT = 10.0  # seconds; the forwarding node gives up after its peer_silence (5 s)


async def _record(request: web.Request, decode):
    try:
        return decode(await read_json(request))
    except SplitRecordError as e:
        raise BadRequest(str(e), param=e.param) from None


@routes.post(FORWARD_PATH)
async def forwarded(request: web.Request) -> web.StreamResponse:
    record = await _record(request, decode_forward)
    record.request.options = parse_options(record.request.options, "request.options")
    record.request.tools = parse_tools(record.request.tools, "request.tools")
    record.request.think = parse_think(record.request.think, "request.think")
    if record.request.logprobs is not None:
        record.request.logprobs = parse_top_logprobs(record.request.logprobs, "request.logprobs")
    return await _answer(request, _generation(request.app["scheduler"], record))


@routes.post(FORWARD_EMBED_PATH)
async def forwarded_embed(request: web.Request) -> web.StreamResponse:
    record = await _record(request, decode_forward_embed)
    record.inputs = parse_embed_inputs(record.inputs, "inputs")
    return await _answer(request, _embedding(request.app["scheduler"], record))


async def _generation(scheduler, record) -> AsyncIterator[object]:
    gen = await Generation(scheduler, record.model, record.request, record.keep_alive, forward=False).start()
    try:
        yield ForwardStart(gen.model_name, gen.digest, gen.load_seconds)
        async for event in gen:
            yield event
        yield gen.done
    finally:
        await gen.close()  # also when the forwarding node went away: that cancels the job


async def _embedding(scheduler, record) -> AsyncIterator[object]:
    result, served = await embed(scheduler, record.model, record.inputs, truncate=record.truncate,
                                 keep_alive=record.keep_alive, num_ctx=record.num_ctx, forward=False)
    yield ForwardStart(served.name, served.digest, served.load_seconds)
    yield result


async def _answer(request: web.Request, events: AsyncIterator[object]) -> web.StreamResponse:
    """`events` as signed NDJSON frames, heartbeats between them."""
    frames = FrameSigner(request.app["cluster"].keyring, request.headers[trust.H_NONCE])
    resp: web.StreamResponse | None = None
    stream = with_heartbeats(events)
    try:
        async for event in stream:
            if resp is None:
                resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                _drop_when_unacked(request)
                await resp.prepare(request)
            await resp.write(frames.line(event))
            if isinstance(event, ANSWER_ENDS):
                audit.note_answered()
    except ConnectionError:  # the forwarding node went away
        raise
    except Exception as exc:
        if resp is None:
            raise  # nothing sent yet: an ordinary (signed) error answer with its status
        status, message, _ = status_and_message(exc)
        await resp.write(frames.line(ErrorEvent(message, status)))
    finally:
        await stream.aclose()
    await resp.write_eof()
    return resp


def _drop_when_unacked(request: web.Request) -> None:
    option = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux; elsewhere the system's own limit
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if option is not None and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, int(UNACKED_LIMIT * 1000))
