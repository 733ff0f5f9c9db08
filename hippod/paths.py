"""Paths built from what a client or a peer sent: validated first, then confined to a root.

Every identifier that ends up in a file name (a blob's sha256, a model digest, a split id) is
checked for its exact format before it is joined to anything, and the joined path is resolved
and must stay inside its root. A request can then never name a file outside hippod's home.
"""

from __future__ import annotations

import re
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class UnsafePath(ValueError):
    """An identifier or file name from a request that may not become a path; answered 400."""

    status = 400


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def check_sha256(value: object, what: str = "digest") -> str:
    """`value` when it is 64 lowercase hex digits; UnsafePath otherwise."""
    if not is_sha256(value):
        raise UnsafePath(f"{what} must be a sha256 digest (64 lowercase hex digits), not {str(value)[:80]!r}")
    return value


def check_token(value: object, what: str) -> str:
    """An id that becomes part of a file name (split ids): letters, digits, '_' and '-' only."""
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise UnsafePath(f"{what} must be 1-64 letters, digits, '_' or '-', not {str(value)[:80]!r}")
    return value


def confined(root: Path, *parts: str) -> Path:
    """`root / parts...`, resolved (links too), refused unless it stays inside `root`."""
    base = Path(root).resolve()
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part or "\\" in part:
            raise UnsafePath(f"unsafe path component {str(part)[:80]!r}")
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base):
        raise UnsafePath(f"path {'/'.join(parts)[:120]!r} points outside {root}")
    return target


def within(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, lies inside `root` (links resolved too)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False
