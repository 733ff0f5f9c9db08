"""Ollama REST API routes: translate HTTP <-> scheduler and registry calls, hold no state."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from aiohttp import web

from hippod import __version__, audit
from hippod.api import ollama_model_types as mt
from hippod.api import ollama_types as t
from hippod.api import status_page
from hippod.api.auth import from_this_machine
from hippod.api.errors import BadRequest, read_json, status_and_message
from hippod.api.fields import get
from hippod.api.inference import Generation, embed
from hippod.registry import modelinfo
from hippod.registry.registry import Registry
from hippod.scheduler import Scheduler, parse_keep_alive

routes = web.RouteTableDef()
NDJSON = "application/x-ndjson"


def _scheduler(request: web.Request) -> Scheduler:
    return request.app["scheduler"]


def _registry(request: web.Request) -> Registry:
    return request.app["registry"]


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    if status_page.wants_html(request):  # a browser: the status page (issue 8)
        return await status_page.page(request)
    return web.Response(text="Ollama is running")


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    models = [t.tag_entry(m) for m in _registry(request).list() if not m.missing]
    return web.json_response({"models": models})


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    out = []
    for m in _scheduler(request).loaded.values():
        entry = t.tag_entry(m.record)
        entry.pop("modified_at")
        size = m.size
        ready = getattr(m.runner, "ready", None)
        device = getattr(ready, "device", "gpu")
        # Ollama's meaning: size_vram is the part in accelerator memory (0 = all on the CPU).
        entry.update(size=size, size_vram=size if device == "gpu" else 0,
                     context_length=m.context_length, expires_at=t.iso(m.expires()))
        entry["hippo"] = {"pid": m.runner.pid, "busy": m.refs, "num_parallel": m.num_parallel,
                          "device": device,
                          "load_seconds": round(m.load_seconds, 3), "estimate": m.estimate,
                          "node": _scheduler(request).node}
        split = m.runner.placement  # a model split across nodes: node -> layers, bytes
        if split:
            entry["hippo"]["split"] = split
        draft = getattr(m.runner, "draft_placement", None)  # its draft runs on a peer
        if draft:
            entry["hippo"]["draft"] = draft
        out.append(entry)
    answer = {"models": out}
    splits = request.app.get("splits")  # issue 6: layers this node runs for a peer's split
    if splits is not None and splits.hosted:
        answer["hippo"] = {"hosted": [h.row() for h in splits.hosted.values()]}
    drafts = request.app.get("remote_drafts")  # drafts this node runs for a peer's target
    if drafts is not None and drafts.hosted:
        answer.setdefault("hippo", {})["drafts"] = [h.row() for h in drafts.hosted.values()]
    return web.json_response(answer)


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    name, verbose = mt.parse_show(await read_json(request))
    registry = _registry(request)
    rec = registry.get(name)
    model_dir = registry.model_dir(rec)
    template = modelinfo.chat_template(model_dir)
    info = modelinfo.ollama_model_info(model_dir, rec, verbose=verbose)
    tensors = modelinfo.tensor_list(model_dir) if verbose else None
    return web.json_response(mt.show_response(rec, template, info,
                                              modelinfo.capabilities(template), tensors))


@routes.post("/api/copy")
async def copy(request: web.Request) -> web.Response:
    body = await read_json(request)
    _registry(request).copy(get(body, "source", str, required=True),
                            get(body, "destination", str, required=True))
    return web.Response(status=200)


@routes.delete("/api/delete")
async def delete(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = get(body, "model", str) or get(body, "name", str, required=True)
    registry = _registry(request)
    rec = registry.get(name)
    await _scheduler(request).unload(rec.name, "deleted")
    await asyncio.to_thread(registry.delete, rec.name)
    return web.Response(status=200)


async def _progress_stream(request: web.Request, stream: bool, work) -> web.StreamResponse:
    """Run `work(progress)` and report progress as NDJSON lines (or one final object)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def progress(event: dict) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    task = asyncio.ensure_future(work(progress))
    if not stream:
        try:
            await task
        finally:
            task.cancel()
        return web.json_response({"status": "success"})
    resp = web.StreamResponse(headers={"Content-Type": NDJSON})
    await resp.prepare(request)
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                await resp.write((json.dumps(getter.result()) + "\n").encode())
                continue
            getter.cancel()
            while not queue.empty():
                await resp.write((json.dumps(queue.get_nowait()) + "\n").encode())
            exc = task.exception()
            line = {"status": "success"} if exc is None else {"error": status_and_message(exc)[1]}
            await resp.write((json.dumps(line) + "\n").encode())
            break
    finally:
        if not task.done():
            task.cancel()
    await resp.write_eof()
    return resp


@routes.post("/api/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = get(body, "model", str) or get(body, "name", str, required=True)
    stream = get(body, "stream", bool, True)
    registry = _registry(request)
    registry.normalize(name)
    cancel = threading.Event()

    cluster = request.app.get("cluster")

    async def work(progress):
        try:
            rec = None
            if cluster is not None:  # a trusted peer on the LAN first, then the hub
                from hippod.cluster import transfer

                rec = await transfer.pull(cluster, name, progress, cancel=cancel)
            if rec is None:
                await registry.pull(name, progress, cancel=cancel)
        finally:
            cancel.set()

    return await _progress_stream(request, stream, work)


@routes.post("/api/create")
async def create(request: web.Request) -> web.StreamResponse:
    spec = mt.parse_create(await read_json(request))
    registry = _registry(request)
    registry.normalize(spec.name)
    # hippo: what drafts for this one (speculative decoding): a model's name, or a directory
    # (a draft model, or a DFlash draft) imported as `<name>-draft`.
    draft, draft_dir = spec.draft, None
    reveal = from_this_machine(request)
    if draft and draft.startswith(("/", "~")):  # a draft model's directory or .gguf, or a DFlash draft
        draft_dir = draft
        if not os.path.exists(os.path.expanduser(draft_dir)):
            where = f"{draft_dir}: no such file or directory on the daemon's machine" if reveal else \
                f"cannot import from {draft_dir[:200]!r}: it is not a model hippod can read"
            raise BadRequest(f"draft: {where}", param="draft")
        draft = registry.normalize(spec.name).rsplit(":", 1)[0] + "-draft"
    if draft:
        registry.normalize(draft)

    async def work(progress):
        await registry.create_model(spec.name, source=spec.source, files=spec.files,
                                    quantize=spec.quantize, modelfile=spec.modelfile,
                                    jinja_template=spec.jinja_template, progress=progress,
                                    reveal_paths=reveal)
        if draft_dir:
            await registry.create(draft, draft_dir, progress, reveal_paths=reveal)
        if draft is not None:
            registry.set_draft(spec.name, draft)

    return await _progress_stream(request, spec.stream, work)


async def _unload_only(request, name: str, keep_alive, kind: str) -> web.Response:
    """Empty prompt/messages: load the model (or unload it with keep_alive 0), Ollama-style."""
    scheduler = _scheduler(request)
    rec = _registry(request).get(name)
    try:
        unload = keep_alive is not None and parse_keep_alive(keep_alive) == 0
    except ValueError as e:
        raise BadRequest(str(e), param="keep_alive") from None
    if unload:
        await scheduler.stop(rec.name)  # a busy model unloads when its requests end
        return web.json_response(t.load_answer(kind, rec.name, "unload"))
    async with scheduler.lease(rec.name, keep_alive=keep_alive):
        pass
    return web.json_response(t.load_answer(kind, rec.name, "load"))


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


async def _run(request: web.Request, gen: Generation, stream: bool, kind: str) -> web.StreamResponse:
    """Drive a started Generation into NDJSON lines, or one answer when not streaming."""
    name = gen.model_name
    text, thinking, logprobs = [], [], []
    resp = None
    try:
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": NDJSON})
            await resp.prepare(request)
        try:
            async for ev in gen:
                if stream:
                    await resp.write(_line(t.chunk(kind, name, ev.text, ev.thinking, ev.logprobs)))
                    continue
                text.append(ev.text)
                thinking.append(ev.thinking)
                logprobs.extend(ev.logprobs or ())
                if request.transport is None or request.transport.is_closing():
                    return web.Response(status=499)
        except ConnectionError:  # the client went away: closing the generation cancels the job
            raise
        except Exception as exc:
            if not stream:
                raise
            await resp.write(_line(t.error(status_and_message(exc)[1])))
            await resp.write_eof()
            return resp
        d = gen.done
        timings = t.Timings(gen.total_seconds, gen.load_seconds, d.prompt_tokens, d.prompt_seconds,
                            d.completion_tokens, d.eval_seconds)
        final = t.final_chunk(kind, name, d, timings, text="".join(text), thinking="".join(thinking),
                              logprobs=logprobs or None)
        if not stream:
            if gen.request.logprobs is not None:
                final.setdefault("logprobs", [])
            return web.json_response(final)
        await resp.write(_line(final))
        audit.note_answered()
        await resp.write_eof()
        return resp
    finally:
        await gen.close()


async def _generation(request: web.Request, call: t.Call, kind: str) -> web.StreamResponse:
    if call.empty:
        return await _unload_only(request, call.model, call.keep_alive, kind)
    gen = await Generation(_scheduler(request), call.model, call.request, call.keep_alive).start()
    return await _run(request, gen, call.stream, kind)


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _generation(request, t.parse_generate(await read_json(request)), "generate")


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    return await _generation(request, t.parse_chat(await read_json(request)), "chat")


@routes.post("/api/embed")
async def embed_route(request: web.Request) -> web.Response:
    model, inputs, truncate, options, keep_alive = t.parse_embed(await read_json(request))
    t0 = time.perf_counter()
    result, served = await embed(_scheduler(request), model, inputs, truncate=truncate,
                                 keep_alive=keep_alive, num_ctx=options.get("num_ctx"))
    return web.json_response(t.embed_answer(served.name, result.embeddings,
                                            time.perf_counter() - t0, served.load_seconds,
                                            result.prompt_tokens))


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = get(body, "model", str, required=True)
    prompt = get(body, "prompt", str, required=True)
    if not prompt:
        return web.json_response({"embedding": []})
    result, _ = await embed(_scheduler(request), model, [prompt], truncate=True,
                            keep_alive=body.get("keep_alive"))
    return web.json_response({"embedding": result.embeddings[0]})
