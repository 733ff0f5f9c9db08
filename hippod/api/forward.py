"""The peer side of a forwarded request: POST /api/hippo/peer/forward.

Like every peer route it is reached only through peer.peer_auth_middleware: signed with the
cluster secret (else 403 before the body is read), the body size-capped. The generation runs
as one of our own clients' would (our model defaults, our scheduler), but is never forwarded
again; its events go back as signed frames (cluster/forward.py). An error before the first
event is an ordinary signed JSON answer with its status.
"""

from __future__ import annotations

from aiohttp import web

from hippod.api.errors import BadRequest, read_json, status_and_message
from hippod.api.inference import Generation
from hippod.api.request import parse_options, parse_think, parse_tools, parse_top_logprobs
from hippod.cluster import trust
from hippod.cluster.forward import FrameSigner
from hippod.protocol import FORWARD_PATH, ErrorEvent, ForwardStart, SplitRecordError, decode_forward

routes = web.RouteTableDef()


@routes.post(FORWARD_PATH)
async def forwarded(request: web.Request) -> web.StreamResponse:
    try:
        record = decode_forward(await read_json(request))
    except SplitRecordError as e:
        raise BadRequest(str(e), param=e.param) from None
    record.request.options = parse_options(record.request.options, "request.options")
    record.request.tools = parse_tools(record.request.tools, "request.tools")
    record.request.think = parse_think(record.request.think, "request.think")
    if record.request.logprobs is not None:
        record.request.logprobs = parse_top_logprobs(record.request.logprobs, "request.logprobs")
    gen = await Generation(request.app["scheduler"], record.model, record.request, record.keep_alive,
                           forward=False).start()
    try:
        frames = FrameSigner(request.app["cluster"].keyring, request.headers[trust.H_NONCE])
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(frames.line(ForwardStart(gen.model_name, gen.digest, gen.load_seconds)))
        try:
            async for event in gen:
                await resp.write(frames.line(event))
        except ConnectionError:  # the forwarding node went away: closing the generation cancels it
            raise
        except Exception as exc:
            status, message, _ = status_and_message(exc)
            await resp.write(frames.line(ErrorEvent(message, status)))
        else:
            await resp.write(frames.line(gen.done))
        await resp.write_eof()
        return resp
    finally:
        await gen.close()
