"""Which files of a directory the user asked to import may be read, links judged first.

hippod may run with more rights than the person who names the directory (a daemon started by
root, a key holder on the LAN). A link inside that directory could name any file the daemon can
read (`config.json -> /etc/shadow`), so a link is followed only when its target stays inside the
directory itself, or inside the blobs of the same Hugging Face cache repo (hub snapshots are
links `snapshots/<rev>/x -> ../../blobs/<hash>`). Any other link among the model's files is
refused by name; links to directories are never followed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hippod.paths import UnsafePath


class UnsafeLink(UnsafePath):
    """A model file that is a link out of the directory, or not a regular file."""


@dataclass(frozen=True)
class SourceFile:
    name: str  # path inside the model directory, with '/'
    path: Path  # what to open: the file itself, or a link's checked, resolved target


def hub_cache_blobs(root: Path) -> Path | None:
    """`<cache>/models--org--name/blobs` when `root` is (inside) a snapshot of that cache repo."""
    for parent in (root, *root.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent.parent.parent / "blobs"
    return None


def model_files(src: Path, suffixes: tuple[str, ...], recursive: bool = True) -> list[SourceFile]:
    """The files under `src` (or only in it) with one of `suffixes` (hidden ones skipped), sorted
    by name. Raises UnsafeLink naming the first file that may not be read."""
    root = src.resolve()
    hub = hub_cache_blobs(root)
    allowed = [root] + ([hub.resolve()] if hub is not None and hub.is_dir() else [])
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (here / d).is_symlink():
                rel = (here / d).relative_to(root).as_posix()
                raise UnsafeLink(f"{rel}: is a link to a directory; hippod does not follow those "
                                 "(copy the files into the model directory)")
        for name in filenames:
            path = here / name
            if name.startswith(".") or path.suffix not in suffixes:
                continue
            rel = path.relative_to(root).as_posix()
            target = path
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not any(target.is_relative_to(a) for a in allowed):
                    raise UnsafeLink(f"{rel}: is a link to a file outside the model directory; hippod "
                                     "follows links only inside it or inside a Hugging Face cache")
            try:
                mode = target.stat(follow_symlinks=False).st_mode
            except OSError as e:
                raise UnsafeLink(f"{rel}: cannot be read ({e.strerror or e})") from None
            if not stat.S_ISREG(mode):
                raise UnsafeLink(f"{rel}: is not a regular file")
            found.append(SourceFile(rel, target))
        if not recursive:
            break
    return sorted(found, key=lambda f: f.name)


def open_regular(path: Path):
    """Open a checked file for reading without following a link swapped in since the check."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeLink(f"{path.name}: is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
