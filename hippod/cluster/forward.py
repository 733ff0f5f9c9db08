"""Requests for a model this node lacks: copy it, split it, or forward the request to a peer.

The rule: copy the model from a trusted peer when it fits here (today's path), or when it fits
split over this node and peers; otherwise, when a trusted peer holds it and can run it (it has
it loaded, or its memory budget covers it), forward the request there and stream the answer
back. When no peer can, it is copied anyway and the memory guard's refusal names the numbers.

A forwarded request is a signed peer request (cluster/trust.py) to /api/hippo/peer/forward (or
/forward-embed); the peer runs it like one of its own clients' (its model defaults, its
scheduler) but never forwards it again. Its answer is signed frames (cluster/frames.py) with
heartbeats while it has nothing else to send. Closing the event iterator (the client went away)
closes the connection, which cancels the generation on the peer.

A peer lost mid-answer (cut link, frozen or killed host: silence or a broken connection), or one
that refuses before it answers (the model is gone there, it is busy, its memory guard said no),
is not the end of it: placement is decided again without it, and another trusted peer that holds
the model and can run it takes over. A generation continues there after the tokens already sent
(they are replayed after the prompt, not sent again), so a greedy answer is the uncut one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from hippod import audit
from hippod.cluster import frames, planner
from hippod.cluster.frames import ForwardError, PeerLost
from hippod.protocol import (FORWARD_EMBED_PATH, FORWARD_PATH, EmbedResult, ForwardEmbed, ForwardRequest,
                             ForwardStart, GenerateRequest, TokenEvent, forward_body, resumed)
from hippod.runners import Forward
from hippod.scheduler import RUNNER_OVERHEAD, kv_cache_bytes
from hippod.store.records import ModelRecord, PeerRecord

log = logging.getLogger("hippo.forward")

MAX_FAILOVERS = 3  # peers that may take over one request, one after another
ROUTE_FOR = 10.0  # seconds a forwarding decision is reused before it is made again
MAX_ROUTES = 1024  # forwarding decisions remembered at once


class RecentRoutes:
    """Forwarding decisions of the last ROUTE_FOR seconds, by (model, num_ctx): a chat's next
    turn, or a burst, goes where the first request went without asking the peers again for a
    manifest and their budgets (two signed round trips). A decision is dropped as soon as its
    peer is lost or refuses, or stops listing the model; a stale one costs at most a takeover."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._routes: dict[tuple[str, int | None], tuple[Forward, float]] = {}

    def get(self, name: str, num_ctx: int | None, holders: list[PeerRecord]) -> Forward | None:
        """The recent decision, while its peer is among `holders` (usable peers listing `name`)."""
        key = (name, num_ctx)
        hit = self._routes.get(key)
        if hit is None:
            return None
        target, until = hit
        if self.clock() >= until or not any(p.name == target.peer for p in holders):
            del self._routes[key]
            return None
        return target

    def put(self, name: str, num_ctx: int | None, target: Forward) -> None:
        now = self.clock()
        if len(self._routes) >= MAX_ROUTES:  # one per (model, num_ctx) asked: keep it bounded
            self._routes = {k: v for k, v in self._routes.items() if v[1] > now}
            while len(self._routes) >= MAX_ROUTES:
                del self._routes[next(iter(self._routes))]
        self._routes[(name, num_ctx)] = (target, now + ROUTE_FOR)

    def forget(self, name: str, peer: str) -> None:
        for key in [k for k, (t, _) in self._routes.items() if k[0] == name and t.peer == peer]:
            del self._routes[key]


# -- the decision ------------------------------------------------------------------------------


def manifest_record(name: str, manifest: dict, peer: PeerRecord) -> ModelRecord:
    """What the peer's signed manifest says about the model, for the memory estimate only."""
    details = manifest.get("details") or {}
    return ModelRecord(name=name, source=f"peer:{peer.name}", digest=str(manifest.get("digest") or ""),
                       files=manifest["files"], format=manifest["format"],
                       size=sum(f["size"] for f in manifest["files"]), details=details,
                       context_length=_int(details.get("context_length")))


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def split_fits(rec: ModelRecord, ctx: int, parallel: int, local: planner.Node,
               peers: list[planner.Node]) -> bool:
    """Whether some split of `rec` over this node and `peers` fits, judged from the manifest
    alone (layers of equal size): the real plan reads the files once they are here."""
    d = rec.details or {}
    count = int(d.get("num_layers") or 0)
    if count < 2 or not peers:
        return False
    weights = int(d.get("weights_bytes") or rec.size)
    layer = weights // count + kv_cache_bytes(d, ctx, parallel, layers=1)
    parts = planner.ModelParts((layer,) * count, 0, 0, RUNNER_OVERHEAD)
    try:
        planner.plan_auto(local, peers, parts)
    except planner.PlanRefused:
        return False
    return True


async def locate(splits, name: str, num_ctx: int | None) -> ModelRecord | Forward | None:
    """A model this node lacks, named by a request: its copy (fits here or split), a Forward to
    a trusted peer that holds it and can run it, or None when no trusted peer lists it."""
    from hippod.cluster import transfer

    cluster, scheduler = splits.cluster, splits.scheduler
    holders = _holders(cluster, name)
    if not holders:
        return None
    recent = splits.routes.get(name, num_ctx, holders)
    if recent is not None:
        # Reused while the model still does not fit here: memory freed since (a model
        # unloaded) makes this node copy it and run it itself, as a fresh decision would.
        return recent if recent.need > scheduler.budget() else await splits.fetch(name)
    try:
        manifest = await transfer.fetch_manifest(cluster, holders[0], name)
    except transfer.TransferError as e:
        log.info("no manifest of %s from %s (%s): copying as usual", name, holders[0].name, e)
        manifest = None
    if manifest is None:
        return await splits.fetch(name)
    rec = manifest_record(name, manifest, holders[0])
    ctx = scheduler.context_for(rec, num_ctx)
    parallel = splits.settings.num_parallel
    need = scheduler.estimate(rec, ctx, parallel)
    if need <= scheduler.budget():
        return await splits.fetch(name)
    offers = await _offers(splits, cluster.peers.usable())
    local = planner.Node(cluster.name, scheduler.budget())
    if split_fits(rec, ctx, parallel, local, [planner.Node(p.name, free) for p, free, _, _ in offers]):
        return await splits.fetch(name)
    target = _runner_among(offers, name, need)
    if target is not None:
        log.info("%s needs %d bytes, more than this node's budget and any split: forwarding to %s",
                 name, need, target.peer)
        splits.routes.put(name, num_ctx, target)
        return target
    return await splits.fetch(name)


async def _offers(splits, peers: list[PeerRecord]) -> list[tuple]:
    """What each peer's memory guard can give now (splits.budget_of), of those that answer."""
    return [a for a in await asyncio.gather(*(splits.budget_of(p) for p in peers)) if a is not None]


def _runner_among(offers: list[tuple], name: str, need: int) -> Forward | None:
    """The first peer that holds `name` and has it loaded or a budget that covers it."""
    for peer, _, _, answer in offers:
        loaded = answer.get("loaded") if isinstance(answer.get("loaded"), list) else []
        total = answer.get("budget") if isinstance(answer.get("budget"), int) else 0
        if name in peer.models and (name in loaded or need <= total):
            return Forward(peer.name, need)
    return None


def _holders(cluster, name: str, excluding: frozenset[str] = frozenset()) -> list[PeerRecord]:
    """The usable trusted peers that list `name`, none of `excluding`."""
    return [p for p in cluster.peers.usable() if name in p.models and p.name not in excluding]


async def successor(splits, name: str, need: int, tried: frozenset[str]) -> Forward | None:
    """Another trusted peer, none of `tried`, that holds `name` and can run it."""
    holders = _holders(splits.cluster, name, tried)
    return _runner_among(await _offers(splits, holders), name, need) if holders else None


# Refusals another holder may not share: the model is gone there, it is busy, or its memory
# guard said no. Anything else (a bad request, a forged answer) would fail the same anywhere.
REFUSED_THERE = frozenset({404, 503, 507})


def _passes_on(error: ForwardError, answered: bool) -> bool:
    """Whether `error` lets another peer take the request: the peer was lost, or it refused
    before it answered anything."""
    return isinstance(error, PeerLost) or (not answered and error.status in REFUSED_THERE)


# -- the node that forwards --------------------------------------------------------------------


async def relay(splits, target: Forward, model: str, request: GenerateRequest, keep_alive
                ) -> AsyncIterator[object]:
    """The events of a generation a peer runs for us: a ForwardStart, then a runner's. When the
    peer is lost, another one that holds the model continues after the tokens already sent."""
    served, sent = [target.peer], []
    start: ForwardStart | None = None
    while True:
        body = forward_body(ForwardRequest(model, resumed(request, sent), keep_alive))
        answered = False  # by this peer
        try:
            async for event in frames.request(splits.cluster, splits.session, target.peer, FORWARD_PATH, body,
                                              splits.settings.peer_silence):
                answered = True
                if isinstance(event, ForwardStart):
                    if start is not None:  # a successor's: the client has the first one
                        _same_weights(model, start, event, served)
                        continue
                    start = event
                elif isinstance(event, TokenEvent):
                    sent.extend(event.ids or [event.token])
                yield event
            return
        except ForwardError as e:
            if not _passes_on(e, answered):
                splits.routes.forget(splits.scheduler.registry.normalize(model), target.peer)
                raise
            target = await _take_over(splits, model, target, served, e)


def _same_weights(model: str, first: ForwardStart, then: ForwardStart, served: list[str]) -> None:
    if then.digest != first.digest:
        raise ForwardError(f"{model}: peer {served[-1]} holds other weights than peer {served[0]} "
                           "did, so it cannot continue the answer")


async def _take_over(splits, model: str, lost: Forward, served: list[str], why: ForwardError) -> Forward:
    """The peer that continues a request whose peer was lost or refused it; when none can,
    ForwardError with the last peer's status (a refusal's numbers stay in its message)."""
    name = splits.scheduler.registry.normalize(model)
    splits.routes.forget(name, lost.peer)
    nxt = None
    if len(served) <= MAX_FAILOVERS:
        nxt = await successor(splits, name, lost.need, frozenset(served))
    if nxt is None:
        raise ForwardError(f"{why}; no other trusted peer can run {model}", why.status)
    log.warning("%s: %s; peer %s takes over", model, why, nxt.peer)
    served.append(nxt.peer)
    audit.note_model_source("forwarded to " + ", then ".join(served))
    return nxt


async def embed(splits, target: Forward, record: ForwardEmbed) -> tuple[ForwardStart, EmbedResult]:
    """Embeddings a peer computes for us (another peer that holds the model if it is lost)."""
    served = [target.peer]
    while True:
        try:
            events = [e async for e in frames.request(splits.cluster, splits.session, target.peer,
                                                      FORWARD_EMBED_PATH, vars(record),
                                                      splits.settings.peer_silence)]
        except ForwardError as e:  # an embedding answers all at once: nothing was sent yet
            if not _passes_on(e, answered=False):
                raise
            target = await _take_over(splits, record.model, target, served, e)
            continue
        result = events[-1]
        if not (len(events) == 2 and isinstance(result, EmbedResult) and _vectors(result, len(record.inputs))):
            raise ForwardError(f"peer {target.peer} answered an embedding request with something else")
        return events[0], result


def _vectors(result: EmbedResult, count: int) -> bool:
    v = result.embeddings
    return (isinstance(v, list) and len(v) == count and isinstance(result.prompt_tokens, int)
            and all(isinstance(e, list) and all(isinstance(x, (int, float)) for x in e) for e in v))
