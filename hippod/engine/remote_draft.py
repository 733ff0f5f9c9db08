"""Drafting on another machine: the draft model runs in a process on a trusted peer, the target
here. Only token ids and accept counts cross the wire, and each side keeps its own KV cache.

    python -m hippod.engine.remote_draft --model DIR --bind ADDR [--port P]

The session key arrives in the environment (HIPPO_DRAFT_KEY, hex), never on a command line or
the wire. A connection proves the key by answering a random challenge with an HMAC before the
server reads anything else; the server binds one interface address only, and every frame is
size-capped. Given the target's address (`--allow`, what the daemon saw the session asked
from), a connection from anywhere else is closed before it is greeted, so strangers cannot fill
the slots of connections waiting to prove the key. One session is served at a time (the target
speculates for one stream at a time); a newer authenticated connection replaces the older.

Per round the target sends one frame: how many drafts of the last round it kept, the tokens of
its history the draft has not seen, the pending token, and how many to draft; the server
answers with that many greedy draft ids. A greedy draft is a deterministic proposal, so sampled
verification stays lossless (see speculative.accept_sampled). Any fault on the client side
(a timeout, a closed socket, a bad frame) marks the proposer dead: the stream goes on without a
draft, never an error.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time

import mlx.core as mx

log = logging.getLogger("hippo.remote_draft")

KEY_ENV = "HIPPO_DRAFT_KEY"
CHALLENGE_BYTES = 32
MAC_BYTES = 32
MAX_DRAFT = 32  # drafts asked per round
MAX_FRAME = 4 * (1 << 20)  # bytes of one frame (a context of ~1M token ids)
AUTH_TIMEOUT = 3.0  # seconds a connection has to answer the challenge
MAX_PENDING = 8  # connections greeted and not yet proven, at once
IDLE_TIMEOUT = 120.0  # seconds a session may sit silent (drafting paused by the policy)
ROUND_TIMEOUT = 1.0  # seconds the target waits for one round's drafts before going on alone
RETRY_AFTER = 30.0  # seconds after a lost peer before a new stream tries it again
_HEAD = struct.Struct("<IIII")  # accepted, n, pending, number of new tokens


class ProtocolError(Exception):
    """A frame that breaks the draft protocol; the connection is dropped."""


def proof(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, b"hippo-draft-session\0" + challenge, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the draft connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<I", len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    (size,) = struct.unpack("<I", _recv_exact(sock, 4))
    if size > limit:
        raise ProtocolError(f"draft frame of {size} bytes (limit {limit})")
    return _recv_exact(sock, size)


def _ids(payload: bytes) -> list[int]:
    if len(payload) % 4:
        raise ProtocolError("token ids are 4 bytes each")
    return list(struct.unpack(f"<{len(payload) // 4}I", payload))


def _pack(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def vocab_size(model) -> int:
    from hippod.engine.speculative import decoder_of

    try:
        return int(decoder_of(model)[1].embed_tokens.weight.shape[0])
    except (AttributeError, ValueError):
        return int(model.args.vocab_size)


# -- the target's side ---------------------------------------------------------------------------


class RemoteDrafter:
    """Drafts with a model on a peer: a connection (and the peer's draft cache) per stream."""

    kind = "remote"

    def __init__(self, target, host: str, port: int, key: bytes, *, timeout: float = ROUND_TIMEOUT):
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.vocab = vocab_size(target)
        self.down_until = 0.0  # a lost peer is not waited for by every new stream

    def lost(self) -> None:
        self.down_until = time.monotonic() + RETRY_AFTER

    def make_cache(self) -> list:
        return []  # the draft's KV cache lives on the peer

    def proposer(self, cache: list) -> "RemoteProposer":
        return RemoteProposer(self)


class RemoteProposer:
    """One stream's drafts from the peer. It learns the context from `history` in `propose`, so
    it needs no prefill (a prompt-cache hit here is a cold start there: it sends the whole
    context once). `dead` once the peer failed; it then drafts nothing."""

    taps: tuple[int, ...] = ()

    def __init__(self, drafter: RemoteDrafter):
        self.drafter = drafter
        self.sock: socket.socket | None = None
        self.dead = time.monotonic() < drafter.down_until
        self.known = 0  # tokens of history the peer's draft holds
        self.accepted = 0  # kept drafts of the last round, told with the next one

    def prefill(self, tokens: list[int], features) -> None:
        pass

    def _connect(self) -> socket.socket:
        d = self.drafter
        sock = socket.create_connection((d.host, d.port), timeout=d.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = _recv_exact(sock, CHALLENGE_BYTES)
        sock.sendall(proof(d.key, challenge))
        return sock

    def propose(self, pending: int, n: int, history: list[int], decoding):
        if self.dead:
            return None, None
        n = min(n, MAX_DRAFT)
        fresh = history[self.known:-1]
        try:
            if self.sock is None:
                self.sock = self._connect()
            send_frame(self.sock, _HEAD.pack(self.accepted, n, pending, len(fresh)) + _pack(fresh))
            drafts = _ids(recv_frame(self.sock, 4 * MAX_DRAFT))
            if len(drafts) > n or any(t >= self.drafter.vocab for t in drafts):
                raise ProtocolError("the peer sent drafts that were not asked for")
        except (OSError, ProtocolError, struct.error) as e:
            log.warning("remote draft at %s:%s lost (%s); going on without it",
                        self.drafter.host, self.drafter.port, e)
            self.close()
            self.dead = True
            self.drafter.lost()
            return None, None
        self.known = len(history)
        self.accepted = 0
        return (mx.array(drafts, mx.uint32), None) if drafts else (None, None)

    def commit(self, drafts: list[int], accepted: int, features) -> None:
        if drafts:
            self.known += accepted
            self.accepted = accepted

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def __del__(self):
        self.close()


# -- the peer's side -----------------------------------------------------------------------------


class DraftSession:
    """The draft model's state for one connection, kept in step with the target's history."""

    def __init__(self, model, context_length: int, vocab: int):
        from mlx_lm.models.cache import make_prompt_cache

        from hippod.engine.drafts import ModelProposer
        from hippod.engine.speculative import Decoding

        self.proposer = ModelProposer(model, make_prompt_cache(model))
        self.decoding = Decoding()
        self.context_length, self.vocab = context_length, vocab
        self.drafts: list[int] = []
        self.length = 0

    def round(self, frame: bytes) -> list[int]:
        if len(frame) < _HEAD.size:
            raise ProtocolError("short draft round")
        accepted, n, pending, count = _HEAD.unpack_from(frame)
        fresh = _ids(frame[_HEAD.size:])
        if count != len(fresh) or n > MAX_DRAFT or accepted > len(self.drafts):
            raise ProtocolError("malformed draft round")
        if any(t >= self.vocab for t in fresh) or pending >= self.vocab:
            raise ProtocolError("token id outside the vocabulary")
        self.length += accepted + len(fresh) + 1
        if self.length + n > self.context_length:
            raise ProtocolError("the stream outgrew the draft's context")
        if self.drafts:
            self.proposer.commit(self.drafts, accepted, None)
        if fresh:
            self.proposer.prefill(fresh, None)
        drafts, _ = self.proposer.propose(pending, n, [], self.decoding) if n else (None, None)
        self.drafts = drafts.tolist() if drafts is not None else []
        if not self.drafts:
            self.proposer.behind.append(pending)  # fed next round, like any pending token
        return self.drafts


class DraftServer:
    """Serves draft sessions on one address; the caller's thread does all the MLX work."""

    def __init__(self, model, key: bytes, bind: str, port: int = 0, context_length: int = 131072,
                 allow: str | None = None):
        address = ipaddress.ip_address(bind)
        self.allow = _plain_address(allow) if allow else None
        if address.is_unspecified:
            raise ValueError("a draft server binds one interface's address, not a wildcard")
        self.model, self.key, self.context_length = model, key, context_length
        self.vocab = vocab_size(model)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((bind, port))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.pending: dict[socket.socket, tuple[bytes, bytearray, float]] = {}  # greeted, not yet proven
        self.session: DraftSession | None = None
        self.refused = 0
        self.stopped = threading.Event()

    def _greet(self) -> None:
        """A new connection gets its challenge; its answer is awaited without blocking the
        session being served (a slow or silent stranger costs nothing but a slot)."""
        conn, source = self.listener.accept()
        if self.allow is not None and _plain_address(source[0]) != self.allow:
            conn.close()
            self.refused += 1
            return
        if len(self.pending) >= MAX_PENDING:
            conn.close()
            self.refused += 1
            return
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        try:
            conn.setblocking(False)
            conn.send(challenge)  # 32 bytes into an empty send buffer
        except OSError:
            conn.close()
            return
        self.pending[conn] = (challenge, bytearray(), time.monotonic() + AUTH_TIMEOUT)

    def _hear(self, conn: socket.socket) -> None:
        """More of a pending connection's answer; once complete, it becomes the session or is closed."""
        challenge, answer, deadline = self.pending[conn]
        try:
            chunk = conn.recv(MAC_BYTES - len(answer))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        answer += chunk
        if chunk and len(answer) < MAC_BYTES:
            return
        del self.pending[conn]
        if len(answer) < MAC_BYTES or not hmac.compare_digest(bytes(answer), proof(self.key, challenge)):
            self.refused += 1
            conn.close()
            return
        self._drop()
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(AUTH_TIMEOUT)  # the rest of a frame once its start came
        self.conn = conn
        self.session = DraftSession(self.model, self.context_length, self.vocab)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, (_, _, deadline) in list(self.pending.items()):
            if now > deadline:
                del self.pending[conn]
                self.refused += 1
                conn.close()

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.session = None, None
        mx.clear_cache()

    def serve_forever(self) -> None:
        idle_since = time.monotonic()
        while not self.stopped.is_set():
            watched = [self.listener, *self.pending] + ([self.conn] if self.conn is not None else [])
            ready, _, _ = select.select(watched, [], [], 0.5)
            self._expire()
            if self.listener in ready:
                self._greet()
            for conn in ready:
                if conn in self.pending:
                    self._hear(conn)
            if self.conn is not None and self.conn in ready:
                idle_since = time.monotonic()
                try:
                    send_frame(self.conn, _pack(self.session.round(recv_frame(self.conn))))
                except (OSError, ProtocolError, struct.error) as e:
                    log.info("draft session ended: %s", e)
                    self._drop()
            elif self.conn is not None and time.monotonic() - idle_since > IDLE_TIMEOUT:
                self._drop()  # a session silent for too long


def _plain_address(text: str):
    """An address as one value, an IPv4-mapped IPv6 one as its IPv4 (how a dual-stack socket
    may report a v4 peer)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    return getattr(address, "ipv4_mapped", None) or address


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hippod-draft-server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--bind", required=True, help="the cluster interface address to listen on")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--context-length", type=int, default=131072)
    ap.add_argument("--allow", help="the only address a session may come from (the target's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s draft[%(process)d] %(levelname)s %(message)s")
    try:
        key = bytes.fromhex(os.environ.pop(KEY_ENV, ""))
        if len(key) < 16:
            raise ValueError(f"{KEY_ENV} must hold a key of at least 16 bytes (hex)")
        if ipaddress.ip_address(args.bind).is_unspecified:
            raise ValueError("a draft server binds one interface's address, not a wildcard")
        if args.allow:
            _plain_address(args.allow)
    except ValueError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 2
    from mlx_lm import load

    model, _ = load(args.model)
    mx.eval(model.parameters())
    server = DraftServer(model, key, args.bind, args.port, args.context_length, allow=args.allow)

    def watch_stdin() -> None:  # the daemon closing our stdin (or dying) ends us
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    import psutil

    print(json.dumps({"port": server.port, "pid": os.getpid(),
                      "rss": psutil.Process().memory_info().rss}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
