"""Copy a model from a trusted peer instead of downloading it again.

The peer's manifest comes signed (so nobody on the LAN can swap it); each blob then moves over
plain HTTP with Range requests into `<home>/blobs/.partial-<sha256>`, so an interrupted copy
resumes where it stopped, and is renamed into the blob store only when its sha256 matches the
manifest. The model is then recorded like any pull (source `peer:<node name>`).

Blob bodies are read with http.client in a worker thread: a 100 MB copy neither blocks the
daemon's event loop nor pays for per-chunk hops between the loop and a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import re
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import quote

import aiohttp
from yarl import URL

from hippod.cluster import trust
from hippod.cluster.peers import Cluster, peer_url
from hippod.registry.registry import MODEL_FILE_SUFFIXES, RegistryError
from hippod.store.records import ModelRecord, PeerRecord

log = logging.getLogger("hippo.transfer")

MANIFEST_PATH = "/api/hippo/peer/manifest"
BLOB_PATH = "/api/hippo/peer/blobs/sha256-{}"
CHUNK = 4 << 20
PROGRESS_EVERY = 4 << 20  # bytes between progress events
IO_TIMEOUT = 30.0  # seconds without a byte before a copy is given up (and can be resumed)
MAX_FILES = 1000

Progress = Callable[[dict], None]


class TransferError(RegistryError):
    """A peer copy failed part way; what was received stays on disk for the next try."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message, status)


def check_manifest(message: object) -> dict:
    """The manifest a peer sent, validated: file names must stay inside the model directory."""
    if not isinstance(message, dict) or not isinstance(message.get("files"), list):
        raise TransferError("peer sent a malformed manifest")
    files = message["files"]
    if not 0 < len(files) <= MAX_FILES:
        raise TransferError("peer sent a manifest with no or too many files")
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("sha256"), str)
                and isinstance(f.get("size"), int) and f["size"] >= 0):
            raise TransferError("peer sent a malformed manifest entry")
        if not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) or not safe_file_name(f["name"]):
            raise TransferError(f"peer sent an unsafe manifest entry {f.get('name')!r}")
    if not isinstance(message.get("format"), str) or not isinstance(message.get("details", {}), dict):
        raise TransferError("peer sent a malformed manifest")
    return message


def safe_file_name(name: str) -> bool:
    p = PurePosixPath(name)
    return (bool(name) and "\\" not in name and not p.is_absolute()
            and all(part not in ("", ".", "..") for part in name.split("/"))
            and p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith("."))


async def fetch_manifest(cluster: Cluster, peer: PeerRecord, name: str) -> dict | None:
    """The peer's signed manifest of `name`, or None when it does not have the model."""
    path = f"{MANIFEST_PATH}?model={quote(name, safe='')}"
    timeout = aiohttp.ClientTimeout(total=10)
    last_error = "no address"
    for address in peer.addresses:
        headers = cluster.keyring.sign("GET", path, b"", peer.node_id)
        url = URL(peer_url(address, peer.port, path), encoded=True)  # sent exactly as signed
        try:
            async with cluster.session.get(url, headers=headers, timeout=timeout) as resp:
                body, status = await resp.read(), resp.status
                signature = resp.headers.get(trust.H_SIGNATURE)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            last_error = str(e) or type(e).__name__
            continue
        if status == 403:
            raise TransferError(f"peer {peer.name} refused us (403): not the same cluster secret?", 403)
        if not cluster.keyring.verify_response(headers.get(trust.H_NONCE, ""), status, body, signature,
                                               peer.node_id):
            raise TransferError(f"peer {peer.name} sent an answer without a valid signature")
        if status == 404:
            return None
        if status != 200:
            raise TransferError(f"peer {peer.name} answered {status} for the manifest of {name}")
        try:
            return check_manifest(json.loads(body))
        except ValueError:
            raise TransferError(f"peer {peer.name} sent a manifest that is not JSON") from None
    raise TransferError(f"cannot reach peer {peer.name}: {last_error}")


def download_blob(cluster: Cluster, peer: PeerRecord, sha256: str, size: int, dest: Path,
                  progress: Callable[[int, int], None], cancel: threading.Event) -> int:
    """Fetch one blob into `dest` via `.partial-<sha256>`, resuming, verifying (blocking).

    Returns the offset it resumed from (0 for a fresh copy).
    """
    partial = dest.parent / f".partial-{sha256}"
    digest = hashlib.sha256()
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > size:
        partial.unlink()
        offset = 0
    if offset:  # the hash must cover what we already have
        with open(partial, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    resumed = offset
    if offset < size:
        resp, conn = _open_blob(cluster, peer, sha256, offset)
        try:
            if resp.status == 200 and offset:  # the peer ignored Range: start over
                offset, resumed, digest = 0, 0, hashlib.sha256()
            offset = _copy_body(resp, partial, "ab" if offset else "wb", offset, size, digest,
                                progress, cancel)
        except (OSError, http.client.HTTPException) as e:
            raise TransferError(f"copy of blob {sha256[:12]} from peer {peer.name} broke off: "
                                f"{e or type(e).__name__} (pull again to resume)") from None
        finally:
            conn.close()
    if offset != size:
        raise TransferError(f"peer {peer.name} closed the copy of blob {sha256[:12]} at {offset} of "
                            f"{size} bytes (pull again to resume)")
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise TransferError(f"sha256 mismatch for blob {sha256[:12]} from peer {peer.name}; "
                            "the copy was discarded")
    partial.replace(dest)
    return resumed


def _open_blob(cluster: Cluster, peer: PeerRecord, sha256: str, offset: int):
    """(response, connection) for the blob from the first address of the peer that answers."""
    path = BLOB_PATH.format(sha256)
    last_error = "no address"
    for address in peer.addresses:
        headers = cluster.keyring.sign("GET", path, b"", peer.node_id)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        conn = http.client.HTTPConnection(address, peer.port, timeout=IO_TIMEOUT)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            last_error = str(e) or type(e).__name__
            continue
        ok = resp.status == 200 or (resp.status == 206 and
                                    (resp.getheader("Content-Range") or "").startswith(f"bytes {offset}-"))
        if not ok:
            conn.close()
            raise TransferError(f"peer {peer.name} answered {resp.status} for blob {sha256[:12]}",
                                403 if resp.status == 403 else 502)
        return resp, conn
    raise TransferError(f"cannot reach peer {peer.name}: {last_error}")


def _copy_body(resp, partial: Path, mode: str, offset: int, size: int, digest,
               progress: Callable[[int, int], None], cancel: threading.Event) -> int:
    """Receive into `partial` from `offset`, hashing as it goes; returns the new offset.
    What was written stays on disk if the connection breaks off."""
    view = memoryview(bytearray(CHUNK))
    reported = offset
    with open(partial, mode) as out:
        while offset < size:
            if cancel.is_set():
                raise TransferError("pull cancelled (pull again to resume)", 499)
            n = resp.readinto(view[:min(CHUNK, size - offset)])
            if not n:
                break
            digest.update(view[:n])
            out.write(view[:n])
            offset += n
            if offset - reported >= PROGRESS_EVERY or offset == size:
                progress(offset, size)
                reported = offset
    return offset


# -- a whole model ----------------------------------------------------------------------------


async def pull_from_peer(cluster: Cluster, peer: PeerRecord, name: str, progress: Progress,
                         cancel: threading.Event) -> ModelRecord | None:
    """Copy model `name` from `peer`; None when the peer does not have it."""
    registry = cluster.registry
    progress({"status": "pulling manifest"})
    manifest = await fetch_manifest(cluster, peer, name)
    if manifest is None:
        return None
    files = [{"name": f["name"], "sha256": f["sha256"], "size": f["size"]} for f in manifest["files"]]
    existing = registry.store.get_model(name)
    if existing and not existing.missing and _same_files(existing.files, files):
        progress({"status": f"{name} is up to date"})
        return existing
    progress({"status": f"copying from peer {peer.name}"})
    started, moved = time.perf_counter(), 0
    for f in files:
        sha, size = f["sha256"], f["size"]
        dest = registry.blob_path(sha)
        status = f"pulling {f['name']}"
        event = {"status": status, "digest": f"sha256:{sha}", "total": size}
        lock = cluster.blob_locks.setdefault(sha, asyncio.Lock())
        async with lock:
            if dest.is_file() and dest.stat().st_size == size:
                progress({**event, "completed": size})
                continue

            def report(done: int, total: int, event=event) -> None:
                progress({**event, "completed": done})

            partial = dest.parent / f".partial-{sha}"
            if partial.exists() and 0 < partial.stat().st_size <= size:
                progress({**event, "status": f"resuming {f['name']} at {partial.stat().st_size} bytes",
                          "completed": partial.stat().st_size})
            resumed = await asyncio.to_thread(download_blob, cluster, peer, sha, size, dest, report, cancel)
            moved += size - resumed
    progress({"status": "verifying sha256 digest"})
    progress({"status": "writing manifest"})
    details = manifest.get("details") or {}
    rec = await asyncio.to_thread(registry.ingest_manifest, name, files, source=f"peer:{peer.name}",
                                  fmt=manifest["format"], extra=details)
    seconds = time.perf_counter() - started
    log.info("copied %s from peer %s: %d bytes in %.2fs (%.0f MB/s)", name, peer.name, moved, seconds,
             moved / max(seconds, 1e-9) / 1e6)
    return rec


def _same_files(a: list[dict], b: list[dict]) -> bool:
    key = lambda fs: sorted((f["name"], f["sha256"], f["size"]) for f in fs)  # noqa: E731
    return key(a) == key(b)


async def pull(cluster: Cluster, name: str, progress: Progress, *, from_node: str | None = None,
               cancel: threading.Event | None = None) -> ModelRecord | None:
    """Copy `name` from a peer: the one named by `from_node`, else any trusted, answering peer
    that lists it. None when no peer has it (the caller then goes to the hub)."""
    cancel = cancel or threading.Event()
    name = cluster.registry.normalize(name)
    if from_node:
        peer = cluster.peers.find(from_node)
        if peer is None:
            raise RegistryError(f"no peer named {from_node!r} (see `hippoctl nodes`)", 404)
        if not peer.trusted:
            raise RegistryError(f"peer {peer.name} is not trusted: it does not hold this cluster's "
                                "secret (`hippoctl cluster join TOKEN` there)", 403)
        if cluster.peers.is_stale(peer):
            raise RegistryError(f"peer {peer.name} is not answering", 503)
        rec = await pull_from_peer(cluster, peer, name, progress, cancel)
        if rec is None:
            raise RegistryError(f"peer {peer.name} does not have model '{name}'", 404)
        return rec
    for peer in [p for p in cluster.peers.usable() if name in p.models]:
        try:
            rec = await pull_from_peer(cluster, peer, name, progress, cancel)
        except TransferError as e:
            if cancel.is_set():
                raise
            log.warning("pull of %s from peer %s failed: %s", name, peer.name, e)
            progress({"status": f"peer {peer.name} failed ({e}); trying elsewhere"})
            continue
        if rec is not None:
            return rec
    return None
