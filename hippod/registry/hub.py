"""Download an MLX model repository from the Hugging Face hub: resumable, verified, cancellable.

Synchronous on purpose: the daemon runs it in a worker thread and forwards the progress events.
huggingface_hub's own `hf_hub_download` throws partial files away when it fails, so a pull that is
cut off or cancelled would start over; instead this module uses the library's lower-level pieces
(`HfApi.model_info`, `get_hf_file_metadata`, `http_get`) and keeps `<file>.incomplete` next to the
destination, so the next pull resumes with a Range request.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers, filter_repo_objects

# What mlx_lm.load needs: weights, config and tokenizer files. Nothing else (no *.bin, *.pth,
# *.gguf, images, or remote code).
MLX_FILE_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.tiktoken", "*.jinja", "*.txt")
INCOMPLETE_SUFFIX = ".incomplete"
_HASH_CHUNK = 4 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """A pull failed; the message is meant for the user who typed the model name."""


class PullCancelled(HubError):
    """The caller set the cancel event; partial files stay on disk so the next pull resumes."""


@dataclass(frozen=True)
class PullProgress:
    """One progress event, shaped like Ollama's pull stream (`status`, `digest`, `total`, `completed`)."""

    status: str
    file: str | None = None
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass(frozen=True)
class DownloadedFile:
    name: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class RemoteFile:
    """A file as the hub lists it. `sha256` is known for LFS files; `blob_id` (git sha1) otherwise."""

    name: str
    size: int | None
    sha256: str | None
    blob_id: str | None


ProgressCallback = Callable[[PullProgress], None]


def download_repo(
    repo_id: str,
    revision: str | None,
    dest_dir: Path,
    progress: ProgressCallback | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    allow_patterns: Sequence[str] | None = None,
    cancel: threading.Event | None = None,
    timeout: float = 10.0,
) -> list[DownloadedFile]:
    """Download the files an MLX model needs from `repo_id` at `revision` into `dest_dir`.

    Every file is checked against the hub's sha256 (LFS files) or git blob id (small files); a
    file that does not match is deleted and HubError raised. Files already complete in
    `dest_dir` are verified and kept. `timeout` bounds each metadata request; body reads use
    HF_HUB_DOWNLOAD_TIMEOUT. Raises HubError (PullCancelled when `cancel` is set).
    """
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    report = progress or (lambda event: None)
    dest_dir = Path(dest_dir)
    with _hub_errors(repo_id, revision, endpoint):
        _check_cancel(cancel, repo_id)
        report(PullProgress("pulling manifest"))
        canonical_id, commit, files = list_model_files(repo_id, revision, endpoint=endpoint, token=token,
                                                       allow_patterns=allow_patterns, timeout=timeout)
        dest_dir.mkdir(parents=True, exist_ok=True)
        _check_disk_space(files, dest_dir)
        downloaded = []
        for remote in files:
            _check_cancel(cancel, repo_id)
            downloaded.append(_pull_file(canonical_id, commit, remote, dest_dir, report, endpoint=endpoint,
                                         token=token, cancel=cancel, timeout=timeout))
        report(PullProgress("success"))
        return downloaded


def list_model_files(
    repo_id: str,
    revision: str | None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    allow_patterns: Sequence[str] | None = None,
    timeout: float = 10.0,
) -> tuple[str, str, list[RemoteFile]]:
    """(canonical repo id, commit sha, files to fetch) for a repo revision.

    Pinning the commit means a push to the repo during a pull cannot mix two versions.
    """
    info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True,
                                                token=token, timeout=timeout)
    siblings = info.siblings or []
    if allow_patterns is None:
        # MLX repos are flat; nested folders hold other formats (onnx/, original/, ...).
        siblings = [s for s in siblings if "/" not in s.rfilename]
    chosen = filter_repo_objects(siblings, allow_patterns=list(allow_patterns or MLX_FILE_PATTERNS),
                                 key=lambda s: s.rfilename)
    files = [RemoteFile(name=s.rfilename, size=(s.lfs.size if s.lfs else s.size),
                        sha256=(s.lfs.sha256 if s.lfs else None), blob_id=(None if s.lfs else s.blob_id))
             for s in chosen]
    files.sort(key=lambda f: f.name)
    if allow_patterns is None and not any(f.name.endswith(".safetensors") for f in files):
        raise HubError(f"model '{repo_id}' has no MLX weights (*.safetensors) on the hub; "
                       "pick an MLX repo, e.g. one from mlx-community")
    return info.id or repo_id, info.sha or revision or constants.DEFAULT_REVISION, files


def _pull_file(repo_id: str, commit: str, remote: RemoteFile, dest_dir: Path, report: ProgressCallback, *,
               endpoint: str, token: str | bool | None, cancel: threading.Event | None,
               timeout: float) -> DownloadedFile:
    target = _safe_target(dest_dir, remote.name)
    status = f"pulling {remote.name}"
    digest = f"sha256:{remote.sha256}" if remote.sha256 else None

    if target.is_file() and (remote.size is None or target.stat().st_size == remote.size):
        sha256 = _verify(target, remote, cancel, repo_id, delete_on_mismatch=False)
        if sha256 is not None:
            size = target.stat().st_size
            report(PullProgress(status, remote.name, f"sha256:{sha256}", size, size))
            return DownloadedFile(remote.name, target, size, sha256)
        target.unlink()

    url = hf_hub_url(repo_id, remote.name, revision=commit, endpoint=endpoint)
    metadata = get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=endpoint)
    size = remote.size if remote.size is not None else metadata.size
    if remote.sha256 is None and metadata.etag and _SHA256.fullmatch(metadata.etag):
        remote = replace(remote, sha256=metadata.etag)  # an LFS etag is the file's sha256
    headers = build_hf_headers(token=token)
    if _origin(metadata.location) != _origin(url):
        headers.pop("authorization", None)  # signed CDN url: credentials must not leave the hub

    partial = target.with_name(target.name + INCOMPLETE_SUFFIX)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and size is not None and partial.stat().st_size > size:
        partial.unlink()  # longer than the file can be: not ours to resume
    with open(partial, "ab") as sink:
        resume_from = sink.tell()
        report(PullProgress(status, remote.name, digest, size, resume_from))
        bar = functools.partial(_ProgressBar, on_bytes=lambda done: report(
            PullProgress(status, remote.name, digest, size, done)), cancel=cancel, repo_id=repo_id)
        http_get(metadata.location, sink, resume_size=resume_from, headers=headers, expected_size=size,
                 displayed_filename=remote.name, tqdm_class=bar)

    report(PullProgress("verifying sha256 digest", remote.name, digest, size, size))
    sha256 = _verify(partial, remote, cancel, repo_id, delete_on_mismatch=True)
    os.replace(partial, target)
    final_size = target.stat().st_size
    return DownloadedFile(remote.name, target, final_size, sha256)


def _verify(path: Path, remote: RemoteFile, cancel: threading.Event | None, repo_id: str, *,
            delete_on_mismatch: bool) -> str | None:
    """sha256 of `path` when it matches what the hub published; else None, or HubError (file deleted)."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(f"blob {size}\0".encode()) if remote.blob_id and not remote.sha256 else None
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            _check_cancel(cancel, repo_id)
            sha256.update(chunk)
            if git_sha1 is not None:
                git_sha1.update(chunk)
    actual = sha256.hexdigest()
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"size {size} bytes, expected {remote.size}"
    elif remote.sha256 and actual != remote.sha256.lower():
        problem = f"sha256 {actual}, expected {remote.sha256}"
    elif git_sha1 is not None and git_sha1.hexdigest() != remote.blob_id:
        problem = f"git blob id {git_sha1.hexdigest()}, expected {remote.blob_id}"
    if problem is None:
        return actual
    if not delete_on_mismatch:
        return None
    path.unlink(missing_ok=True)
    raise HubError(f"file '{remote.name}' of model '{repo_id}' is corrupt ({problem}); "
                   "it was deleted, pull again to re-download it")


class _ProgressBar:
    """Stands in for tqdm inside `http_get`: turns chunk updates into progress events and stops the
    transfer when the pull is cancelled (before the chunk is written, so the partial file stays whole)."""

    def __init__(self, *, on_bytes: Callable[[int], None], cancel: threading.Event | None, repo_id: str,
                 initial: int = 0, **_tqdm_arguments: object) -> None:
        self.n = initial
        self._on_bytes = on_bytes
        self._cancel = cancel
        self._repo_id = repo_id

    def update(self, n: int = 1) -> None:
        _check_cancel(self._cancel, self._repo_id)
        self.n += n
        self._on_bytes(self.n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def _check_cancel(cancel: threading.Event | None, repo_id: str) -> None:
    if cancel is not None and cancel.is_set():
        raise PullCancelled(f"pull of '{repo_id}' was cancelled")


def _check_disk_space(files: list[RemoteFile], dest_dir: Path) -> None:
    """Refuse before downloading anything when the remaining bytes cannot fit."""
    needed = 0
    for remote in files:
        if remote.size is None:
            continue
        target = dest_dir / remote.name
        partial = target.with_name(target.name + INCOMPLETE_SUFFIX)
        if target.is_file() and target.stat().st_size == remote.size:
            continue
        have = partial.stat().st_size if partial.is_file() else 0
        needed += max(remote.size - have, 0)
    free = shutil.disk_usage(dest_dir).free
    if needed > free:
        raise HubError(f"not enough disk space in {dest_dir}: the download needs {_human(needed)}, "
                       f"only {_human(free)} free")


def _safe_target(dest_dir: Path, name: str) -> Path:
    """Path for a repo file name; refuses names that would land outside `dest_dir`."""
    root = dest_dir.resolve()
    target = (root / name).resolve()
    if root not in target.parents:
        raise HubError(f"refusing file name {name!r} from the hub: it points outside {dest_dir}")
    return target


def _origin(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.scheme, parsed.netloc.lower()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub / httpx / OS errors into HubError messages a user can act on."""
    try:
        yield
    except HubError:
        raise
    except GatedRepoError as e:
        raise HubError(f"model '{repo_id}' is gated: accept its terms on the hub's web page and "
                       "log in (HF_TOKEN or `hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"model '{repo_id}' not found on the hub ({endpoint})") from e
    except RevisionNotFoundError as e:
        raise HubError(f"revision '{revision}' not found for model '{repo_id}'") from e
    except RemoteEntryNotFoundError as e:
        raise HubError(f"a file of model '{repo_id}' disappeared from the hub during the pull; "
                       f"pull again ({_first_line(e)})") from e
    except OfflineModeIsEnabled as e:
        raise HubError("hub access is disabled (HF_HUB_OFFLINE is set)") from e
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused the request for '{repo_id}': {_first_line(e)}") from e
    except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError) as e:
        raise HubError(f"the connection to {endpoint} kept breaking off while pulling '{repo_id}' "
                       f"({_describe(e)}); pull again to resume") from e
    except httpx2.TransportError as e:
        raise HubError(f"cannot reach {endpoint}: {_describe(e)}") from e
    except httpx2.HTTPError as e:
        raise HubError(f"download from {endpoint} failed: {_describe(e)}") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HubError(f"disk full while pulling '{repo_id}': {e}") from e
        raise HubError(f"pull of '{repo_id}' failed: {e}") from e


def _describe(e: Exception) -> str:
    return _first_line(e) or type(e).__name__


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
