"""/v1/responses: the OpenAI Responses API over the same generation as chat completions.

Shapes live in responses_types; this only drives a Generation into one response object or an
SSE stream of typed events (`event: <type>` + `data: {...}`), and always closes it.
"""

from __future__ import annotations

from aiohttp import web

from hippod import audit
from hippod.api import responses_types as t
from hippod.api.errors import read_json, status_and_message
from hippod.api.inference import Generation
from hippod.api.openai import SSE_HEADERS, _check_model_name, _client_gone, _scheduler

routes = web.RouteTableDef()


async def _send(resp: web.StreamResponse, event: dict) -> None:
    await resp.write(f"event: {event['type']}\ndata: {t.dumps(event)}\n\n".encode())


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    call = t.parse_responses(await read_json(request))
    _check_model_name(request, call.model)
    gen = await Generation(_scheduler(request), call.model, call.request, call.keep_alive).start()
    builder = t.ResponseBuilder(gen.model_name, call.echo)
    try:
        if not call.stream:
            async for ev in gen:
                builder.feed(ev.text, ev.thinking, ev.logprobs)
                if _client_gone(request):
                    return web.Response(status=499)
            builder.finish(gen.done)
            return web.json_response(builder.response, dumps=t.dumps)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        for event in builder.start():
            await _send(resp, event)
        try:
            async for ev in gen:
                for event in builder.feed(ev.text, ev.thinking, ev.logprobs):
                    await _send(resp, event)
        except ConnectionError:  # the client went away: closing the generation cancels the job
            raise
        except Exception as exc:
            await _send(resp, builder.error(*status_and_message(exc)))
            await resp.write_eof()
            return resp
        for event in builder.finish(gen.done):
            await _send(resp, event)
        audit.note_answered()
        await resp.write_eof()
        return resp
    finally:
        await gen.close()
