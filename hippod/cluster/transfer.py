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
import os
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
CHUNK = 4 << 20  # receive and hash buffer
PROGRESS_EVERY = 4 << 20  # bytes between progress events
PARALLEL = 4  # blobs copied at once, and connections a pull spreads over its large blobs
MIN_RANGE = 16 << 20  # a blob is split into ranges no smaller than this
SAVE_EVERY = 16 << 20  # bytes a range moves between saves of its progress
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


class _Plan:
    """Which byte ranges of a blob are on disk, saved beside the partial file so that a copy
    cut off anywhere resumes each range where it stopped. A range's `done` only ever counts
    bytes already written; the whole file is still hashed before it is accepted."""

    def __init__(self, path: Path, size: int, ranges: list[list[int]]):
        self.path, self.size, self.ranges = path, size, ranges  # [start, end, done] each
        self.lock = threading.Lock()
        self.saving = threading.Lock()
        self.hexdigest: str | None = None  # set once every byte is on disk and hashed

    @classmethod
    def read(cls, partial: Path, size: int, parts: int = PARALLEL) -> _Plan | None:
        """What an earlier copy left, as a plan; None when it cannot be trusted."""
        path = partial.with_name(partial.name + ".ranges")
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                ranges = [[int(a), int(b), int(c)] for a, b, c in saved["ranges"]]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            ok = saved["size"] == size and _covers(ranges, size) and partial.exists()
            return cls(path, size, ranges) if ok else None
        # A partial without a plan was written front to back: its length is what it holds.
        held = partial.stat().st_size if partial.exists() else 0
        if held > size:
            return None
        plan = cls(path, size, [[0, held, held]] if held else [])
        plan.ranges += [[a, b, a] for a, b in _split(held, size, parts)]
        return plan

    @classmethod
    def load(cls, partial: Path, size: int, parts: int) -> _Plan:
        """The plan to continue with; what cannot be trusted is deleted and the copy starts over."""
        plan = cls.read(partial, size, parts)
        if plan is None:
            partial.unlink(missing_ok=True)
            partial.with_name(partial.name + ".ranges").unlink(missing_ok=True)
            plan = cls.read(partial, size, parts)
        return plan

    def save(self) -> None:
        with self.saving:  # one writer at a time: the ranges' threads all save
            with self.lock:
                text = json.dumps({"size": self.size, "ranges": self.ranges})
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.path)

    def done_bytes(self) -> int:
        with self.lock:
            return sum(d - a for a, _, d in self.ranges)

    def contiguous(self) -> int:
        """Bytes from the start of the blob that are all on disk."""
        with self.lock:
            end = 0
            for a, b, d in sorted(self.ranges):
                if a > end:
                    break
                end = max(end, d)
                if d < b:
                    break
            return end

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _covers(ranges: list[list[int]], size: int) -> bool:
    at = 0
    for a, b, d in sorted(ranges):
        if a != at or not a <= d <= b:
            return False
        at = b
    return at == size


def _split(start: int, size: int, parts: int) -> list[tuple[int, int]]:
    """[start, size) in up to `parts` ranges of at least MIN_RANGE bytes."""
    left = size - start
    if left <= 0:
        return []
    n = max(1, min(parts, left // MIN_RANGE))
    step = -(-left // n)
    return [(a, min(a + step, size)) for a in range(start, size, step)]


class _Hasher(threading.Thread):
    """Hashes the blob from its start, in order, beside the copy.

    The range that reaches the hashed frontier hands each buffer over as it writes it (`feed`:
    hashed from memory, never read again); bytes that were written ahead of the frontier (the
    other ranges, an earlier try's) are read back by this thread once everything before them is
    on disk. Either way each byte is hashed once, at `at`, under `lock`."""

    def __init__(self, partial: Path, plan: _Plan):
        super().__init__(name="blob-hash", daemon=True)
        self.partial, self.plan = partial, plan
        self.digest = hashlib.sha256()
        self.at = 0  # bytes hashed so far
        self.lock = threading.Lock()
        self.moved = threading.Condition()
        self.closing = False
        self.error: BaseException | None = None

    def feed(self, offset: int, data: memoryview) -> bool:
        """`data` was just written at `offset`: hash it from memory if the frontier is there.
        False when it was not (this thread is to read it back: nudge it)."""
        if offset != self.at:  # `at` only grows: a stale read just skips the fast path
            return False
        with self.lock:
            if offset == self.at:
                self.digest.update(data)
                self.at += len(data)
                return True
        return False

    def nudge(self) -> None:
        with self.moved:
            self.moved.notify()

    def finish(self) -> str:
        with self.moved:
            self.closing = True
            self.moved.notify()
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def run(self) -> None:
        buf = memoryview(bytearray(CHUNK))
        try:
            with open(self.partial, "rb", buffering=0) as f:
                while self.at < self.plan.size:
                    ready = self.plan.contiguous()
                    if ready <= self.at:
                        with self.moved:
                            if self.closing:
                                return
                            self.moved.wait(0.2)
                        continue
                    with self.lock:
                        at = self.at
                        if at >= ready:
                            continue
                        f.seek(at)
                        n = f.readinto(buf[:min(CHUNK, ready - at)])
                        if not n:
                            return
                        self.digest.update(buf[:n])
                        self.at = at + n
        except BaseException as e:  # reported by finish()
            self.error = e


class _Either:
    """Set when any of its events is (the caller's cancel, or a sibling copy's failure)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class _NoRanges(Exception):
    """The peer answered a range request with the whole blob."""


def download_blob(cluster: Cluster, peer: PeerRecord, sha256: str, size: int, dest: Path,
                  progress: Callable[[int, int], None], cancel: threading.Event,
                  parts: int = PARALLEL) -> int:
    """Fetch one blob into `dest` via `.partial-<sha256>`, resuming, verifying (blocking).

    Ranges of a large blob come over up to `parts` connections at once, written in place and
    hashed in order beside them (see _Hasher). Returns the bytes that were already there (0 for
    a fresh copy)."""
    partial = dest.parent / f".partial-{sha256}"
    plan = _Plan.load(partial, size, parts)
    resumed = plan.done_bytes()
    try:
        _fetch_ranges(cluster, peer, sha256, partial, plan, progress, cancel)
    except _NoRanges:  # an old or odd peer: one stream from the start
        partial.unlink(missing_ok=True)
        plan = _Plan(plan.path, size, [[0, size, 0]])
        resumed = 0
        _fetch_ranges(cluster, peer, sha256, partial, plan, progress, cancel)
    if plan.done_bytes() != size:
        raise TransferError(f"peer {peer.name} closed the copy of blob {sha256[:12]} at "
                            f"{plan.done_bytes()} of {size} bytes (pull again to resume)")
    if plan.hexdigest != sha256:
        partial.unlink(missing_ok=True)
        plan.remove()
        raise TransferError(f"sha256 mismatch for blob {sha256[:12]} from peer {peer.name}; "
                            "the copy was discarded")
    partial.replace(dest)
    plan.remove()
    return resumed


def _fetch_ranges(cluster: Cluster, peer: PeerRecord, sha256: str, partial: Path, plan: _Plan,
                  progress: Callable[[int, int], None], cancel: threading.Event) -> None:
    """Copy every unfinished range at once; sets plan.hexdigest once all bytes are on disk."""
    plan.save()  # before the partial file exists: a partial without a plan is front-to-back
    with open(partial, "ab"):
        pass
    hasher = _Hasher(partial, plan)
    hasher.start()
    feed = hasher.feed
    stop = threading.Event()  # one range failed: the others stop too (and keep what they have)
    reported = [plan.done_bytes()]
    report_lock = threading.Lock()

    def moved(hashed: bool) -> None:
        if not hashed:  # bytes ahead of the frontier, or a range's end: there may be reading back
            hasher.nudge()
        done = plan.done_bytes()
        with report_lock:
            if done - reported[0] >= PROGRESS_EVERY or done == plan.size:
                reported[0] = done
                progress(done, plan.size)

    todo = [r for r in plan.ranges if r[2] < r[1]]
    errors: list[BaseException] = []

    def run(r: list[int]) -> None:
        try:
            _fetch_range(cluster, peer, sha256, partial, plan, r, moved, feed, cancel, stop)
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=run, args=(r,), name="blob-range", daemon=True) for r in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plan.save()
    if errors or plan.done_bytes() != plan.size:
        hasher.finish()
        plan.hexdigest = None
        if errors:
            e = next((e for e in errors if isinstance(e, (TransferError, _NoRanges))), errors[0])
            if isinstance(e, (TransferError, _NoRanges)):
                raise e
            raise TransferError(f"copy of blob {sha256[:12]} from peer {peer.name} broke off: "
                                f"{e or type(e).__name__} (pull again to resume)") from None
        return
    if plan.size == 0 or not todo:
        progress(plan.size, plan.size)
    plan.hexdigest = hasher.finish()


def _fetch_range(cluster: Cluster, peer: PeerRecord, sha256: str, partial: Path, plan: _Plan,
                 r: list[int], moved: Callable[[bool], None], feed: Callable[[int, memoryview], bool],
                 cancel: threading.Event, stop: threading.Event) -> None:
    """Receive one range into its place in `partial`, recording its progress as it goes."""
    start, end, offset = r
    whole = start == 0 and end == plan.size
    resp, conn = _open_blob(cluster, peer, sha256, offset, None if whole and offset == 0 else end)
    view = memoryview(bytearray(CHUNK))
    saved = offset
    try:
        if resp.status == 200 and offset:
            raise _NoRanges()
        fd = os.open(partial, os.O_WRONLY)
        try:
            while offset < end:
                if cancel.is_set():
                    raise TransferError("pull cancelled (pull again to resume)", 499)
                if stop.is_set():
                    return
                n = resp.readinto(view[:min(CHUNK, end - offset)])
                if not n:
                    break
                written = 0
                while written < n:
                    written += os.pwrite(fd, view[written:n], offset + written)
                hashed = feed(offset, view[:n])  # before the plan has it: hashed from memory
                offset += n
                with plan.lock:
                    r[2] = offset
                if offset - saved >= SAVE_EVERY:
                    plan.save()
                    saved = offset
                moved(hashed and offset < end)
        finally:
            os.close(fd)
    except (OSError, http.client.HTTPException) as e:
        raise TransferError(f"copy of blob {sha256[:12]} from peer {peer.name} broke off: "
                            f"{e or type(e).__name__} (pull again to resume)") from None
    finally:
        conn.close()


def _open_blob(cluster: Cluster, peer: PeerRecord, sha256: str, offset: int, end: int | None):
    """(response, connection) for bytes [offset, end) of the blob (to its end when `end` is
    None), from the first address of the peer that answers."""
    path = BLOB_PATH.format(sha256)
    last_error = "no address"
    for address in peer.addresses:
        headers = cluster.keyring.sign("GET", path, b"", peer.node_id)
        if offset or end is not None:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
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


def partial_bytes(dest: Path, sha256: str, size: int) -> int:
    """How much of a blob an earlier, cut-off copy left on disk (0 if none or untrusted)."""
    try:
        plan = _Plan.read(dest.parent / f".partial-{sha256}", size)
    except OSError:
        return 0
    return plan.done_bytes() if plan is not None else 0


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
    started = time.perf_counter()
    slots = asyncio.Semaphore(PARALLEL)
    # The connections go to the large blobs: one alone is cut into PARALLEL ranges, four or
    # more get one stream each. A stream hashes what it receives from memory, while a range
    # ahead of the hashed frontier is read back to be hashed in order: on a CPU-bound receiver
    # (sha256 costs about what the link does) fewer, longer streams move the same bytes for less.
    large = sum(1 for f in files if f["size"] >= 2 * MIN_RANGE)
    parts = max(1, PARALLEL // max(1, large))
    failed = threading.Event()  # one blob failed: stop the others (not the caller's cancel)
    stop = _Either(cancel, failed)

    async def copy(f: dict) -> int:
        sha, size = f["sha256"], f["size"]
        dest = registry.blob_path(sha)
        event = {"status": f"pulling {f['name']}", "digest": f"sha256:{sha}", "total": size}
        lock = cluster.blob_locks.setdefault(sha, asyncio.Lock())
        async with slots, lock:
            if dest.is_file() and dest.stat().st_size == size:
                progress({**event, "completed": size})
                return 0

            def report(done: int, total: int, event=event) -> None:
                progress({**event, "completed": done})

            held = await asyncio.to_thread(partial_bytes, dest, sha, size)
            if 0 < held <= size:
                progress({**event, "status": f"resuming {f['name']} at {held} bytes", "completed": held})
            resumed = await asyncio.to_thread(download_blob, cluster, peer, sha, size, dest, report,
                                              stop, parts)
            return size - resumed

    # Several blobs at once (the small files do not wait behind the weights); the first
    # failure cancels the rest, which keep what they copied for the next try.
    tasks = [asyncio.ensure_future(copy(f)) for f in files]
    try:
        moved = sum(await asyncio.gather(*tasks))
    except BaseException:
        failed.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
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
