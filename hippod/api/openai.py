"""OpenAI-compatible routes under /v1/: translate HTTP <-> scheduler and registry calls.

Shapes live in openai_types; errors become OpenAI error objects in the shared middleware.
A streamed answer only commits to 200 once the runner produced its first event, so a prompt
the runner rejects still gets a proper status instead of an error inside the stream.
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable

from aiohttp import web

from hippod import audit
from hippod.api import openai_types as t
from hippod.api.errors import BadRequest, openai_error, read_json, status_and_message
from hippod.api.inference import Generation, embed
from hippod.protocol import TokenEvent
from hippod.registry.registry import ModelNotFound, Registry, RegistryError
from hippod.scheduler import Scheduler

routes = web.RouteTableDef()
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _scheduler(request: web.Request) -> Scheduler:
    return request.app["scheduler"]


def _registry(request: web.Request) -> Registry:
    return request.app["registry"]


def _check_model_name(request: web.Request, name: str) -> None:
    """A malformed model name is the client's `model` parameter at fault: say so."""
    try:
        _registry(request).normalize(name)
    except RegistryError as e:
        raise BadRequest(str(e), param="model") from None


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _send(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _usage(gen: Generation) -> dict:
    d = gen.done
    return t.usage(d.prompt_tokens, d.completion_tokens, d.cached_tokens, d.drafted, d.accepted)


async def _respond(request: web.Request, gen: Generation, call: t.Call, *,
                   whole: Callable[[str, str, list | None, str], dict], opening: dict | None,
                   piece: Callable[[TokenEvent], dict], closing: Callable[[str], list[dict]],
                   usage_chunk: Callable[[dict], dict]) -> web.StreamResponse:
    """Drive a started Generation into one JSON answer or an SSE stream; always close it.

    `whole(text, thinking, logprobs, finish_reason)` shapes the answer, `piece(event)` a chunk.
    Closing the Generation closes the runner connection, which cancels the job: a client that
    disconnects stops costing compute at the next token.
    """
    try:
        async with contextlib.aclosing(gen.__aiter__()) as events:
            first = await anext(events, None)  # runner errors still become a clean status here
            if not call.stream:
                got = [first] if first else []
                async for ev in events:
                    got.append(ev)
                    if _client_gone(request):
                        return web.Response(status=499)
                logprobs = ([e for ev in got for e in ev.logprobs or ()]
                            if call.request.logprobs is not None else None)
                return web.json_response(whole("".join(ev.text for ev in got),
                                               "".join(ev.thinking for ev in got), logprobs,
                                               t.finish_reason(gen.done.done_reason)))
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            if opening is not None:
                await _send(resp, opening)
            try:
                if first is not None:
                    await _send(resp, piece(first))
                async for ev in events:
                    await _send(resp, piece(ev))
            except ConnectionError:  # the client went away: the finally below cancels the job
                raise
            except Exception as exc:
                await _send(resp, openai_error(*status_and_message(exc)))
                await resp.write_eof()
                return resp
            for chunk in closing(t.finish_reason(gen.done.done_reason)):
                await _send(resp, chunk)
            if call.include_usage:
                await _send(resp, usage_chunk(_usage(gen)))
            await resp.write(b"data: [DONE]\n\n")
            audit.note_answered()
            await resp.write_eof()
            return resp
    finally:
        await gen.close()


def _envelope(gen: Generation, prefix: str, obj: str) -> t.Envelope:
    return t.Envelope(id=t.new_id(prefix), object=obj, model=gen.model_name,
                      system_fingerprint=t.fingerprint(gen.digest))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    call = t.parse_chat(await read_json(request))
    _check_model_name(request, call.model)
    gen = await Generation(_scheduler(request), call.model, call.request, call.keep_alive).start()
    env = _envelope(gen, "chatcmpl", "chat.completion.chunk" if call.stream else "chat.completion")
    usage_on = call.include_usage

    def piece(ev: TokenEvent) -> dict:
        return t.chat_chunk(env, t.chat_delta(ev.text, ev.thinking), with_usage=usage_on,
                            logprobs=ev.logprobs if call.request.logprobs is not None else None)

    def calls() -> list[dict] | None:  # parsed calls, or a required call the limit cut short
        return gen.done.tool_calls or gen.done.partial_tool_calls

    return await _respond(
        request, gen, call,
        whole=lambda text, thinking, logprobs, reason: t.chat_completion(
            env, text, reason, _usage(gen), calls(), thinking, logprobs),
        opening=t.chat_chunk(env, {"role": "assistant", "content": ""}, with_usage=usage_on),
        piece=piece,
        closing=lambda reason: t.chat_closing_chunks(env, reason, calls(), usage_on),
        usage_chunk=lambda u: t.usage_chunk(env, u))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    call = t.parse_completion(await read_json(request))
    _check_model_name(request, call.model)
    gen = await Generation(_scheduler(request), call.model, call.request, call.keep_alive).start()
    env = _envelope(gen, "cmpl", "text_completion")
    usage_on = call.include_usage
    sent = [0]  # characters streamed so far: the text_offset of the next logprob entry

    def piece(ev: TokenEvent) -> dict:
        chunk = t.completion_chunk(env, ev.text, with_usage=usage_on, offset=sent[0],
                                   logprobs=ev.logprobs if call.request.logprobs is not None else None)
        sent[0] += len(ev.text)
        return chunk

    return await _respond(
        request, gen, call,
        whole=lambda text, _thinking, logprobs, reason: t.text_completion(
            env, text, reason, _usage(gen), logprobs),
        opening=None,
        piece=piece,
        closing=lambda reason: [t.completion_chunk(env, "", reason, with_usage=usage_on)],
        usage_chunk=lambda u: t.usage_chunk(env, u))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    data = [t.model_entry(rec) for rec in _registry(request).list() if not rec.missing]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model:.+}")
async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        rec = _registry(request).get(name)
    except RegistryError as e:
        if e.status != 400:
            raise
        raise ModelNotFound(name) from None  # a name that cannot exist is simply not there
    if rec.missing:
        raise ModelNotFound(name)
    return web.json_response(t.model_entry(rec))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = t.parse_embeddings(await read_json(request))
    _check_model_name(request, body.model)
    # OpenAI refuses over-long inputs rather than embedding a prefix: truncate=False does that.
    result, served = await embed(_scheduler(request), body.model, body.inputs, truncate=False,
                                 keep_alive=body.keep_alive)
    size = len(result.embeddings[0]) if result.embeddings else 0
    if body.dimensions is not None and body.dimensions != size:
        raise BadRequest(f"dimensions: {served.name} embeds into {size} dimensions and cannot "
                         f"shorten them; leave dimensions out or send {size}", param="dimensions")
    return web.json_response(t.embedding_list(served.name, result.embeddings,
                                              body.encoding_format, result.prompt_tokens))

