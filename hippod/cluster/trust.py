"""Cluster trust: one shared secret, the join token that carries it, HMAC-signed peer requests.

The LAN is not trusted. A node proves it holds the cluster secret by signing every peer request
(and its JSON answers) with an HMAC over method, path, body hash, time, nonce and both node ids;
the secret itself never crosses the wire. A request is refused when its time is outside a small
window or its nonce was already seen inside that window, so a captured request cannot be replayed.
Seen nonces live in memory only, so a request signed before this process started is refused too:
a restart cannot reopen the window for requests captured earlier. (A peer whose clock lags ours
by d seconds is refused for the first d seconds after we start; NTP keeps d well under one.)

Checking is ordered by cost, and nothing is read before the secret is proven: the headers,
addressee and time first (`precheck`), then the HMAC over the headers and the body hash the
sender declares in them, then the nonce (`authenticate`); only then is the body read, and its
hash must be the one declared (`check_body`). A stranger who knows a node's public id can fake
the cheap headers, but cannot make that node wait on a body it will never get.

The join token is the one place the secret leaves a machine on purpose: the user copies it from
`hippoctl cluster init` on one Mac to `hippoctl cluster join` on another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import secrets
import time
from pathlib import Path

TOKEN_PREFIX = "hippo1"
KEY_FILE = "cluster.key"
MAX_SKEW = 60.0  # seconds a request's clock may differ from ours; also how long nonces are kept
MAX_NONCES = 200_000  # a flood of valid signatures cannot grow the cache without bound

H_NODE = "X-Hippo-Node"  # sender's node id
H_TO = "X-Hippo-To"  # receiver's node id: a request signed for one peer is useless at another
H_TIME = "X-Hippo-Time"
H_NONCE = "X-Hippo-Nonce"
H_SIGNATURE = "X-Hippo-Signature"
H_BODY = "X-Hippo-Body"  # sha256 of the body, covered by the signature: checked before the body is read


class TrustError(Exception):
    """A request or token that does not prove the cluster secret; the message says why."""


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _check(secret: str) -> str:
    """A short checksum so a mistyped token is refused instead of silently splitting the cluster."""
    return hashlib.sha256(b"hippo-token-check\0" + secret.encode()).hexdigest()[:8]


def make_token(secret: str) -> str:
    return f"{TOKEN_PREFIX}.{secret}.{_check(secret)}"


def parse_token(token: str) -> str:
    """The secret inside a join token; TrustError when it is not one."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1]:
        raise TrustError("not a hippo join token (expected hippo1.<secret>.<check>; "
                         "get one with `hippoctl cluster init` on a node of the cluster)")
    if not hmac.compare_digest(_check(parts[1]), parts[2]):
        raise TrustError("join token is damaged (checksum mismatch): copy it again")
    return parts[1]


def fingerprint(secret: str) -> str:
    """A public short name of the cluster, for comparing nodes by eye; reveals nothing usable."""
    return hashlib.sha256(b"hippo-cluster-id\0" + secret.encode()).hexdigest()[:12]


def load_secret(configured: str | None, home: Path) -> str | None:
    """The configured secret (a token or the bare secret) wins over `<home>/cluster.key`."""
    if configured:
        try:
            return parse_token(configured)
        except TrustError:
            return configured.strip()
    path = home / KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a copied-around key file may have lost its mode
    return text or None


def save_secret(home: Path, secret: str) -> Path:
    """Write `<home>/cluster.key`, readable by its owner only, replacing any old one atomically."""
    path = home / KEY_FILE
    tmp = home / f".{KEY_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class ReplayGuard:
    """Nonces seen within the time window; each is accepted once."""

    def __init__(self, window: float = MAX_SKEW, limit: int = MAX_NONCES):
        self.window = window
        self.limit = limit
        self._seen: dict[tuple[str, str], float] = {}
        self._next_prune = 0.0

    def accept(self, sender: str, nonce: str, now: float) -> bool:
        if now >= self._next_prune or len(self._seen) >= self.limit:
            cutoff = now - 2 * self.window
            self._seen = {k: t for k, t in self._seen.items() if t > cutoff}
            self._next_prune = now + self.window / 4
        key = (sender, nonce)
        if key in self._seen or len(self._seen) >= self.limit:
            return False  # a replay, or a flood we refuse rather than forget nonces early
        self._seen[key] = now
        return True


class Keyring:
    """This node's view of the cluster secret: signs outgoing and checks incoming peer traffic.

    Holds the secret in memory only; `secret` may change at run time (`hippoctl cluster join`).
    """

    def __init__(self, node_id: str, secret: str | None):
        self.node_id = node_id
        self.replays = ReplayGuard()
        self.secret = secret
        # Requests signed before this are refused (their nonces were lost); stamps have 1 ms steps.
        self.started = time.time() - 0.001

    @property
    def secret(self) -> str | None:
        return self._secret

    @secret.setter
    def secret(self, value: str | None) -> None:
        self._secret = value
        self._key = (hmac.new(value.encode(), b"hippo peer auth v1", hashlib.sha256).digest()
                     if value else None)

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self._secret) if self._secret else None

    def _mac(self, *parts: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, body: bytes, to: str) -> dict[str, str]:
        """Headers that authenticate one request to node `to` (none without a secret: it will get 403)."""
        if self._key is None:
            return {H_NODE: self.node_id, H_TO: to}
        stamp, nonce, digest = f"{time.time():.3f}", secrets.token_hex(16), body_hash(body)
        sig = self._mac("req", method.upper(), path, digest, stamp, nonce, self.node_id, to)
        return {H_NODE: self.node_id, H_TO: to, H_TIME: stamp, H_NONCE: nonce, H_SIGNATURE: sig,
                H_BODY: digest}

    def precheck(self, headers, now: float | None = None) -> str:
        """The cheap checks, before the body is read: a secret here, every header, addressed to
        us, signed inside the window and after this process started. The claimed sender, or
        TrustError."""
        if self._key is None:
            raise TrustError("this node has no cluster secret (run `hippoctl cluster init` or `join`)")
        try:
            sender, to, stamp, nonce, sig = (headers[h] for h in (H_NODE, H_TO, H_TIME, H_NONCE, H_SIGNATURE))
        except KeyError:
            raise TrustError("peer request is not signed") from None
        if to != self.node_id:
            raise TrustError("peer request was signed for another node")
        if not (0 < len(nonce) <= 64 and 0 < len(sig) <= 128 and 0 < len(sender) <= 64 and len(stamp) <= 32
                and all(v.isascii() and v.isprintable() for v in (sender, stamp, nonce, sig))):
            raise TrustError("peer request has malformed signature headers")
        now = time.time() if now is None else now
        try:
            signed_at = float(stamp)
        except ValueError:
            raise TrustError("peer request has a malformed timestamp") from None
        if not math.isfinite(signed_at):
            raise TrustError("peer request has a malformed timestamp")
        skew = abs(now - signed_at)
        if skew > self.replays.window:
            raise TrustError(f"peer request timestamp is {skew:.0f}s off (clocks out of sync?)")
        if signed_at < self.started:
            raise TrustError("peer request was signed before this node started (a replay, or clocks "
                             "out of sync)")
        return sender

    def authenticate(self, method: str, path: str, headers, now: float | None = None) -> str:
        """The sender's node id if the headers are signed for us with the secret, over the body
        hash they declare (the body is not needed yet: see check_body); else TrustError. Uses
        up the request's nonce."""
        sender = self.precheck(headers, now)
        stamp, nonce, sig = headers[H_TIME], headers[H_NONCE], headers[H_SIGNATURE]
        digest = headers.get(H_BODY, "")
        if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise TrustError(f"peer request has no {H_BODY} header (the sha256 of its body)")
        expected = self._mac("req", method.upper(), path, digest, stamp, nonce, sender, self.node_id)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")):
            raise TrustError("peer request signature does not match this cluster's secret")
        if not self.replays.accept(sender, nonce, time.time() if now is None else now):
            raise TrustError("peer request was already used (replay refused)")
        return sender

    @staticmethod
    def check_body(body: bytes, headers) -> None:
        """The body that arrived is the one the (authenticated) headers declare, or TrustError."""
        if not hmac.compare_digest(body_hash(body), headers.get(H_BODY, "")):
            raise TrustError("peer request body does not match its signed hash (altered on the way)")

    def verify(self, method: str, path: str, body: bytes, headers, now: float | None = None) -> str:
        """The sender's node id if the request, body and all, is signed for us with the
        secret; else TrustError (a body that does not match leaves the nonce unused)."""
        self.precheck(headers, now)
        self.check_body(body, headers)
        return self.authenticate(method, path, headers, now)

    def derive(self, label: str) -> bytes:
        """A key for one purpose (a draft session), which every holder of the secret can make
        and nobody else: it never needs to cross the wire."""
        if self._key is None:
            raise TrustError("this node has no cluster secret")
        return hmac.new(self._key, b"hippo derive v1\0" + label.encode(), hashlib.sha256).digest()

    def sign_response(self, nonce: str, status: int, body: bytes) -> str | None:
        """Binds an answer to the request it answers, so nobody in between can forge one."""
        if self._key is None:
            return None
        return self._mac("resp", nonce, str(status), body_hash(body), self.node_id)

    def verify_response(self, nonce: str, status: int, body: bytes, signature: str | None,
                        responder: str) -> bool:
        if self._key is None or not signature:
            return False
        expected = self._mac("resp", nonce, str(status), body_hash(body), responder)
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape"))

    def sign_frame(self, nonce: str, seq: int, data: str) -> str:
        """One frame of a streamed answer, bound to the request (its nonce) and to its place in
        the stream, so frames can be neither forged, reordered, replayed nor dropped unseen."""
        if self._key is None:
            raise TrustError("this node has no cluster secret")
        return self._mac("frame", nonce, str(seq), body_hash(data.encode()), self.node_id)

    def verify_frame(self, nonce: str, seq: int, data: str, mac: str, responder: str) -> bool:
        if self._key is None:
            return False
        expected = self._mac("frame", nonce, str(seq), body_hash(data.encode("utf-8", "surrogatepass")),
                             responder)
        return hmac.compare_digest(expected.encode(), mac.encode("utf-8", "surrogateescape"))
