"""A local stand-in for the Hugging Face hub, so pulls can be tested without the internet.

Serves model repos from local directories with the endpoints and headers huggingface_hub uses
(model info with file metadata, HEAD/GET on /resolve with X-Repo-Commit / ETag / X-Linked-*),
redirects LFS files to a second port the way the hub redirects to its CDN, answers Range requests
with 206, and shapes errors like the hub (X-Error-Code RepoNotFound / RevisionNotFound /
EntryNotFound). Knobs break it on purpose: cut a transfer after N bytes, ignore Range headers, lie
about a sha256 or a size. Everything binds to 127.0.0.1 only.

    with start_hub({"acme/tiny-mlx": repo_dir}) as hub:
        download_repo("acme/tiny-mlx", None, dest, endpoint=hub.endpoint)
        assert any(r.range for r in hub.requests)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

# Suffixes the hub's default .gitattributes stores in LFS; big files go to LFS too.
LFS_SUFFIXES = {".safetensors", ".bin", ".gguf", ".model", ".pth", ".pt", ".h5", ".msgpack", ".npz", ".onnx"}
LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class LoggedRequest:
    """One request the stub answered; `server` is "hub" or "cdn"."""

    server: str
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    status: int = 0


@dataclass
class StubFile:
    name: str
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()


@dataclass
class StubRepo:
    repo_id: str
    commit: str
    files: dict[str, StubFile] = field(default_factory=dict)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _scan_repo(repo_id: str, directory: Path) -> StubRepo:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        name = path.relative_to(directory).as_posix()
        files[name] = StubFile(name=name, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               git_sha1=_git_blob_sha1(data),
                               lfs=path.suffix in LFS_SUFFIXES or len(data) >= LFS_MIN_SIZE)
    commit = hashlib.sha1("".join(f"{f.name}:{f.sha256}\n" for f in files.values()).encode()).hexdigest()
    return StubRepo(repo_id=repo_id, commit=commit, files=files)


def _library(repo: StubRepo) -> str:
    return "gguf" if any(name.endswith(".gguf") for name in repo.files) else "mlx"


def _error(status: int, code: str, message: str, commit: str | None = None) -> web.Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit:
        headers["X-Repo-Commit"] = commit
    return web.json_response({"error": message}, status=status, headers=headers)


class HubStub:
    """A running stub hub. Use as a context manager, or call close()."""

    rate: int | None = None  # bytes per second to send file bodies at (None: as fast as possible)

    def __init__(self, repos: dict[str, Path], *, lfs_redirect: bool = True) -> None:
        self.repos = {repo_id.lower(): _scan_repo(repo_id, Path(d)) for repo_id, d in repos.items()}
        self.lfs_redirect = lfs_redirect
        self.ignore_range = False  # True: answer Range requests with the whole file (200), like some proxies
        self.downloads: dict[str, int] = {}  # repo id -> download count shown by search
        self.requests: list[LoggedRequest] = []
        self.endpoint = ""
        self.cdn_endpoint = ""
        self._cuts: list[tuple[int, str | None]] = []
        self._lies: dict[tuple[str, str], dict[str, object]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hubstub", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    # ---- knobs -------------------------------------------------------------------------------

    def cut_downloads(self, after_bytes: int, times: int = 1, filename: str | None = None) -> None:
        """The next `times` file-body responses (of `filename`, or of any file) send `after_bytes`
        bytes, then drop the connection."""
        with self._lock:
            self._cuts.extend([(after_bytes, filename)] * times)

    def lie(self, repo_id: str, filename: str, *, sha256: str | None = None, size: int | None = None) -> None:
        """Publish a wrong sha256 and/or size for a file (in model info and in HEAD headers)."""
        lies = self._lies.setdefault((repo_id.lower(), filename), {})
        if sha256 is not None:
            lies["sha256"] = sha256
        if size is not None:
            lies["size"] = size

    def range_requests(self) -> list[LoggedRequest]:
        return [r for r in self.requests if r.range]

    # ---- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> HubStub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._log])
        app.router.add_get("/api/models", self._search)
        app.router.add_get("/api/models/{owner}/{name}", self._model_info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._model_info)
        app.router.add_get("/{owner}/{name}/resolve/{revision}/{filename:.+}", self._resolve)
        app.router.add_get("/cdn/{owner}/{name}/{commit}/{filename:.+}", self._cdn)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        ports = []
        for server in ("hub", "cdn"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(self._runner, sock).start()
            ports.append(sock.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        self.cdn_endpoint = f"http://127.0.0.1:{ports[1]}"
        self._cdn_port = ports[1]

    # ---- handlers ----------------------------------------------------------------------------

    @web.middleware
    async def _log(self, request: web.Request, handler):
        server = "cdn" if request.url.port == self._cdn_port else "hub"
        entry = LoggedRequest(server, request.method, request.path, dict(request.query),
                              request.headers.get("Range"))
        self.requests.append(entry)
        response = await handler(request)
        entry.status = response.status
        return response

    def _repo(self, request: web.Request) -> StubRepo | None:
        return self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}".lower())

    def _published(self, repo: StubRepo, f: StubFile) -> tuple[str, int]:
        lies = self._lies.get((repo.repo_id.lower(), f.name), {})
        return str(lies.get("sha256", f.sha256)), int(lies.get("size", f.size))  # type: ignore[arg-type]

    def _check_revision(self, repo: StubRepo, revision: str) -> bool:
        return revision in ("main", repo.commit)

    async def _model_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        revision = request.match_info.get("revision", "main")
        if not self._check_revision(repo, revision):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        with_blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for f in repo.files.values():
            sibling: dict[str, object] = {"rfilename": f.name}
            if with_blobs:
                sha256, size = self._published(repo, f)
                if f.lfs:
                    pointer = f.pointer
                    sibling.update(blobId=_git_blob_sha1(pointer), size=size,
                                   lfs={"sha256": sha256, "size": size, "pointerSize": len(pointer)})
                else:
                    sibling.update(blobId=f.git_sha1, size=size)
            siblings.append(sibling)
        return web.json_response({"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                                  "sha": repo.commit, "private": False, "gated": False, "disabled": False,
                                  "library_name": _library(repo), "tags": [_library(repo)],
                                  "siblings": siblings})

    async def _search(self, request: web.Request) -> web.Response:
        """GET /api/models?search=&filter=&sort=downloads&limit=: the hub's model search."""
        query = request.query.get("search", "").lower()
        wanted = set(request.query.getall("filter", []))
        hits = [r for r in self.repos.values()
                if query in r.repo_id.lower() and wanted <= {_library(r)}]
        hits.sort(key=lambda r: -self.downloads.get(r.repo_id, 0))
        limit = int(request.query.get("limit") or len(hits) or 1)
        return web.json_response([{"_id": r.commit[:24], "id": r.repo_id, "modelId": r.repo_id,
                                   "library_name": _library(r), "tags": [_library(r)],
                                   "downloads": self.downloads.get(r.repo_id, 0), "likes": 0,
                                   "private": False} for r in hits[:limit]])

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        revision = request.match_info["revision"]
        if not self._check_revision(repo, revision):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        f = repo.files.get(request.match_info["filename"])
        if f is None:
            return _error(404, "EntryNotFound", "Entry not found", commit=repo.commit)
        sha256, size = self._published(repo, f)
        if f.lfs and self.lfs_redirect:
            location = f"{self.cdn_endpoint}/cdn/{repo.repo_id}/{repo.commit}/{f.name}?sig=stub"
            pointer = f.pointer
            return web.Response(status=302, headers={
                "Location": location, "X-Repo-Commit": repo.commit, "ETag": f'"{_git_blob_sha1(pointer)}"',
                "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size)})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{sha256 if f.lfs else f.git_sha1}"'}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size)})
        return await self._send_file(request, f, headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        f = repo.files.get(request.match_info["filename"]) if repo else None
        if repo is None or f is None or request.match_info["commit"] != repo.commit:
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        return await self._send_file(request, f, {"ETag": f'"{f.sha256}"'})

    def _take_cut(self, filename: str) -> int | None:
        with self._lock:
            for i, (after_bytes, only) in enumerate(self._cuts):
                if only is None or only == filename:
                    del self._cuts[i]
                    return after_bytes
        return None

    async def _send_file(self, request: web.Request, f: StubFile, headers: dict[str, str]) -> web.StreamResponse:
        start, end = 0, f.size - 1
        status = 200
        if request.headers.get("Range") and not self.ignore_range:
            match = _RANGE.match(request.headers["Range"].strip())
            if match is None or int(match.group(1)) >= f.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{f.size}"})
            start = int(match.group(1))
            end = min(int(match.group(2)), f.size - 1) if match.group(2) else f.size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        response = web.StreamResponse(status=status, headers={**headers, "Accept-Ranges": "bytes",
                                                              "Content-Type": "application/octet-stream"})
        response.content_length = end - start + 1
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        cut = self._take_cut(f.name)
        budget = end - start + 1 if cut is None else min(cut, end - start + 1)
        step = _CHUNK if self.rate is None else max(self.rate // 20, 1)
        with open(f.path, "rb") as source, contextlib.suppress(ConnectionError):  # the puller may die
            source.seek(start)
            while budget > 0:
                chunk = source.read(min(step, budget))
                if not chunk:
                    break
                await response.write(chunk)
                budget -= len(chunk)
                if self.rate is not None:
                    await asyncio.sleep(len(chunk) / self.rate)
        if cut is not None:
            request.transport.close()  # the client sees a body shorter than Content-Length
            return response
        await response.write_eof()
        return response


@contextlib.contextmanager
def start_hub(repos: dict[str, Path], *, lfs_redirect: bool = True) -> Iterator[HubStub]:
    """Serve `repos` ({"owner/name": directory}) until the block ends."""
    hub = HubStub(repos, lfs_redirect=lfs_redirect)
    try:
        yield hub
    finally:
        hub.close()


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A URL whose server accepts TCP connections and never answers: tests that timeouts fire."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_endpoint() -> str:
    """A URL on a port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def hub_factory() -> Iterator:
    """Fixture: `hub_factory({"owner/name": dir})` starts a stub hub that stops after the test."""
    hubs: list[HubStub] = []

    def start(repos: dict[str, Path], **options) -> HubStub:
        hub = HubStub(repos, **options)
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.close()
