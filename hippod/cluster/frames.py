"""Signed NDJSON frames: how a peer streams its answer to a forwarded request, at both ends.

Each frame carries an HMAC over (our request's nonce, its sequence number, its data), so nobody
on the LAN can inject, reorder, replay or drop events: a frame that does not verify, a gap, or a
stream that ends without its last frame ends the answer with an error that says so.

Liveness: the answering peer sends a Heartbeat frame whenever HEARTBEAT_EVERY passes without
another (it is loading the model, prefilling, waiting for a slot), and the forwarding node
counts a peer that sends nothing for `silence` seconds (the peer_silence setting) as lost. So a
cut link or a frozen host is noticed in seconds, however long the model takes to load there.
Heartbeats are checked like every frame and then dropped: they never reach a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator

import aiohttp

from hippod.cluster import trust
from hippod.cluster.peers import peer_url
from hippod.protocol import (DoneEvent, EmbedResult, ErrorEvent, ForwardFrame, ForwardStart, Heartbeat,
                             decode_event, decode_frame, encode)
from hippod.scheduler import SchedulerError
from hippod.store.records import PeerRecord

log = logging.getLogger("hippo.forward")

HEARTBEAT_EVERY = 1.0  # seconds the answering peer lets pass without a frame
MAX_FRAME = 1 << 20  # bytes of one frame line (a done event with tool calls is far smaller)
CONNECT_TIMEOUT = 10.0
ANSWER_ENDS = (DoneEvent, EmbedResult)  # the events that end an answer
DRAIN_AFTER_LAST = 2.0  # seconds to wait for the end of the stream after its last event


class ForwardError(SchedulerError):
    """A forwarded request that failed: the peer's own status, or 502 for a broken answer."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message, status)


class PeerLost(ForwardError):
    """The peer stopped answering (unreachable, silent, the connection broke): another peer
    that holds the model may take over, where a refusal or a forged frame ends the request."""

    def __init__(self, message: str):
        super().__init__(message, 502)


# -- the peer that answers ---------------------------------------------------------------------


class FrameSigner:
    """Turns one forwarded request's events into signed NDJSON lines, in order."""

    def __init__(self, keyring: trust.Keyring, nonce: str):
        self.keyring = keyring
        self.nonce = nonce
        self.seq = 0

    def line(self, event) -> bytes:
        data = encode(event).decode().rstrip("\n")
        frame = ForwardFrame(self.seq, data, self.keyring.sign_frame(self.nonce, self.seq, data))
        self.seq += 1
        return encode(frame)


async def with_heartbeats(events: AsyncIterator, every: float = HEARTBEAT_EVERY) -> AsyncIterator:
    """`events`, and a Heartbeat whenever `every` seconds pass without one. Closing this closes
    `events` (a pending step is cancelled first: an async generator runs one step at a time)."""
    it = events.__aiter__()
    step: asyncio.Future | None = None
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({step}, timeout=every)
            if not done:
                yield Heartbeat()
                continue
            finished, step = step, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if step is not None:
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
        if hasattr(it, "aclose"):
            await it.aclose()


# -- the node that forwards --------------------------------------------------------------------


async def request(cluster, session: aiohttp.ClientSession, peer_name: str, path: str, body: dict,
                  silence: float) -> AsyncIterator[object]:
    """The events of one signed request to a peer whose answer is frames, heartbeats left out:
    a ForwardStart, then runner events, a DoneEvent or EmbedResult last. Raises ForwardError
    with the peer's status for an answer that is an error, with 502 for one that is not
    authentic, and PeerLost when the peer cannot be reached or goes silent or away."""
    peer = cluster.peers.find(peer_name)
    if peer is None or not peer.trusted:
        raise PeerLost(f"peer {peer_name} is no longer a trusted peer")
    data = json.dumps(body, separators=(",", ":")).encode()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=silence)
    last_error = "no address"
    for address in peer.addresses:
        headers = cluster.keyring.sign("POST", path, data, peer.node_id)
        headers["Content-Type"] = "application/json"
        try:
            resp = await session.post(peer_url(address, peer.port, path), data=data, headers=headers,
                                      timeout=timeout, read_bufsize=MAX_FRAME)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            last_error = str(e) or type(e).__name__
            continue
        try:
            nonce = headers[trust.H_NONCE]
            if resp.status != 200:
                await _refusal(cluster, peer, resp, nonce)
            async for event in _frames(cluster, peer, resp, nonce, silence):
                yield event
            return
        finally:
            resp.close()  # before the end: drops the connection, which cancels the peer's job
    raise PeerLost(f"cannot reach peer {peer.name} to forward the request: {last_error}")


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


async def _line(peer: PeerRecord, resp: aiohttp.ClientResponse, silence: float) -> bytes:
    try:
        line = await asyncio.wait_for(resp.content.readline(), silence)
    except ValueError:
        raise ForwardError(f"peer {peer.name} sent a frame over {MAX_FRAME} bytes") from None
    except asyncio.TimeoutError:  # before the ClientError below: aiohttp's own timeout is both
        raise PeerLost(f"peer {peer.name} went away mid-answer (silent for {silence:g} s)") from None
    except (aiohttp.ClientError, OSError) as e:
        raise PeerLost(f"peer {peer.name} went away mid-answer ({e or type(e).__name__})") from None
    if not line:
        raise PeerLost(f"peer {peer.name} went away mid-answer (the stream ended early)")
    return line


async def _frames(cluster, peer: PeerRecord, resp: aiohttp.ClientResponse, nonce: str,
                  silence: float) -> AsyncIterator[object]:
    seq = 0
    started = False
    while True:
        line = await _line(peer, resp, silence)
        try:
            frame = decode_frame(line)
        except ValueError:
            raise ForwardError(f"peer {peer.name} sent a malformed frame") from None
        if frame.seq != seq or not cluster.keyring.verify_frame(nonce, frame.seq, frame.data, frame.mac,
                                                                peer.node_id):
            log.warning("forwarded answer from %s: frame %d failed authentication", peer.name, seq)
            raise ForwardError(f"the answer from peer {peer.name} failed authentication at frame {seq} "
                               "(tampered with on the way?)")
        seq += 1
        try:
            event = decode_event(frame.data.encode())
        except (ValueError, TypeError, KeyError):
            raise ForwardError(f"peer {peer.name} sent a frame that is no event") from None
        if isinstance(event, Heartbeat):
            continue
        if isinstance(event, ErrorEvent):
            raise ForwardError(f"peer {peer.name}: {event.message}", event.status)
        if started == isinstance(event, ForwardStart):
            raise ForwardError(f"peer {peer.name} sent frames out of order")
        started = True
        if isinstance(event, ANSWER_ENDS):
            await _drain(resp)
            yield event
            return
        yield event


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read to the end of the stream, so the peer finishes its answer cleanly (a connection
    dropped before its end marker cancels the peer's handler, and its log counts a client that
    went away). Whatever comes after the last frame is not part of the answer."""
    async def to_the_end() -> None:
        left = MAX_FRAME
        while left > 0:
            chunk = await resp.content.readany()
            if not chunk:
                return
            left -= len(chunk)

    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(to_the_end(), DRAIN_AFTER_LAST)
