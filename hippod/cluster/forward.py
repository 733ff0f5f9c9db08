"""Requests for a model this node lacks: copy it, split it, or forward the request to a peer.

The rule: copy the model from a trusted peer when it fits here (today's path), or when it fits
split over this node and peers; otherwise, when a trusted peer holds it and can run it (it has
it loaded, or its memory budget covers it), forward the request there and stream the answer
back. When no peer can, it is copied anyway and the memory guard's refusal names the numbers.

A forwarded request is a signed peer request (cluster/trust.py) to /api/hippo/peer/forward; the
peer runs it like one of its own clients' (its model defaults, its scheduler) but never
forwards it again. Its answer is NDJSON ForwardFrames: a ForwardStart, runner events, and a
DoneEvent or ErrorEvent last. Each frame carries an HMAC over (our request's nonce, its
sequence number, its data), so nobody on the LAN can inject, reorder, replay or drop tokens:
a frame that does not verify, a gap, or a stream that ends without its last frame ends the
client's answer with an error that says so. Closing the event iterator (the client went away)
closes the connection, which cancels the generation on the peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

import aiohttp

from hippod.cluster import planner, trust
from hippod.cluster.peers import peer_url
from hippod.protocol import (FORWARD_PATH, DoneEvent, ErrorEvent, ForwardFrame, ForwardRequest, ForwardStart,
                             decode_event, decode_frame, encode, forward_body)
from hippod.runners import Forward
from hippod.scheduler import RUNNER_OVERHEAD, SchedulerError, kv_cache_bytes
from hippod.store.records import ModelRecord, PeerRecord

log = logging.getLogger("hippo.forward")

MAX_FRAME = 1 << 20  # bytes of one frame line (a done event with tool calls is far smaller)
CONNECT_TIMEOUT = 10.0


class ForwardError(SchedulerError):
    """A forwarded request that failed: the peer's own status, or 502 for a broken answer."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message, status)


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
    holders = [p for p in cluster.peers.usable() if name in p.models]
    if not holders:
        return None
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
    offers = [a for a in await asyncio.gather(*(splits.budget_of(p) for p in cluster.peers.usable()))
              if a is not None]
    local = planner.Node(cluster.name, scheduler.budget())
    if split_fits(rec, ctx, parallel, local, [planner.Node(p.name, free) for p, free, _, _ in offers]):
        return await splits.fetch(name)
    for peer, _, _, answer in offers:
        loaded = answer.get("loaded") if isinstance(answer.get("loaded"), list) else []
        total = answer.get("budget") if isinstance(answer.get("budget"), int) else 0
        if name in peer.models and (name in loaded or need <= total):
            log.info("%s needs %d bytes, more than this node's budget and any split: forwarding to %s",
                     name, need, peer.name)
            return Forward(peer.name)
    return await splits.fetch(name)


# -- the node that forwards --------------------------------------------------------------------


async def stream(cluster, session: aiohttp.ClientSession, target: Forward, model: str, request,
                 keep_alive, read_timeout: float) -> AsyncIterator[object]:
    """The peer's events for one forwarded generation: a ForwardStart, then TokenEvents and the
    DoneEvent. Raises ForwardError with the peer's status for an answer that is an error, and
    with 502 for one that is not authentic or breaks off."""
    peer = cluster.peers.find(target.peer)
    if peer is None or not peer.trusted:
        raise ForwardError(f"peer {target.peer} is no longer a trusted peer", 503)
    data = json.dumps(forward_body(ForwardRequest(model, request, keep_alive)), separators=(",", ":")).encode()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=read_timeout)
    last_error = "no address"
    for address in peer.addresses:
        headers = cluster.keyring.sign("POST", FORWARD_PATH, data, peer.node_id)
        headers["Content-Type"] = "application/json"
        try:
            resp = await session.post(peer_url(address, peer.port, FORWARD_PATH), data=data, headers=headers,
                                      timeout=timeout, read_bufsize=MAX_FRAME)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            last_error = str(e) or type(e).__name__
            continue
        try:
            nonce = headers[trust.H_NONCE]
            if resp.status != 200:
                await _refusal(cluster, peer, resp, nonce)
            async for event in _frames(cluster, peer, resp, nonce):
                yield event
            return
        finally:
            resp.close()  # before the end: drops the connection, which cancels the peer's job
    raise ForwardError(f"cannot reach peer {peer.name} to forward the request: {last_error}", 503)


async def _refusal(cluster, peer: PeerRecord, resp: aiohttp.ClientResponse, nonce: str) -> None:
    """The peer's error answer, re-raised with its status once its signature checks out."""
    raw = await resp.content.read(MAX_FRAME)
    if not cluster.keyring.verify_response(nonce, resp.status, raw, resp.headers.get(trust.H_SIGNATURE),
                                           peer.node_id):
        raise ForwardError(f"peer {peer.name} answered {resp.status} without a valid signature")
    try:
        message = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        message = None
    raise ForwardError(f"peer {peer.name}: {message or f'HTTP {resp.status}'}", resp.status)


async def _frames(cluster, peer: PeerRecord, resp: aiohttp.ClientResponse, nonce: str) -> AsyncIterator[object]:
    seq = 0
    while True:
        try:
            line = await resp.content.readline()
        except ValueError:
            raise ForwardError(f"peer {peer.name} sent a frame over {MAX_FRAME} bytes") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ForwardError(f"peer {peer.name} went away mid-answer ({e or type(e).__name__})") from None
        if not line:
            raise ForwardError(f"peer {peer.name} went away mid-answer (the stream ended early)")
        try:
            frame = decode_frame(line)
        except ValueError:
            raise ForwardError(f"peer {peer.name} sent a malformed frame") from None
        if frame.seq != seq or not cluster.keyring.verify_frame(nonce, frame.seq, frame.data, frame.mac,
                                                                peer.node_id):
            log.warning("forwarded answer from %s: frame %d failed authentication", peer.name, seq)
            raise ForwardError(f"the answer from peer {peer.name} failed authentication at frame {seq} "
                               "(tampered with on the way?)")
        try:
            event = decode_event(frame.data.encode())
        except (ValueError, TypeError, KeyError):
            raise ForwardError(f"peer {peer.name} sent a frame that is no event") from None
        if (seq == 0) != isinstance(event, ForwardStart):
            raise ForwardError(f"peer {peer.name} sent frames out of order")
        if isinstance(event, ErrorEvent):
            raise ForwardError(f"peer {peer.name}: {event.message}", event.status)
        yield event
        if isinstance(event, DoneEvent):
            return
        seq += 1


# -- the peer that answers ---------------------------------------------------------------------


class FrameSigner:
    """Turns one forwarded generation's events into signed NDJSON lines, in order."""

    def __init__(self, keyring: trust.Keyring, nonce: str):
        self.keyring = keyring
        self.nonce = nonce
        self.seq = 0

    def line(self, event) -> bytes:
        data = encode(event).decode().rstrip("\n")
        frame = ForwardFrame(self.seq, data, self.keyring.sign_frame(self.nonce, self.seq, data))
        self.seq += 1
        return encode(frame)
