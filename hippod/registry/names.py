"""Model names: `name[:tag]`, validated so a name can never address a path outside the store."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PART = r"[a-z0-9][a-z0-9._-]*"
_NAME = re.compile(rf"^{_PART}(/{_PART})*$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
MAX_NAME = 200


class InvalidName(ValueError):
    pass


@dataclass(frozen=True)
class ModelName:
    name: str
    tag: str = "latest"

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_name(raw: object) -> ModelName:
    """'Gemma-3-12b' -> gemma-3-12b:latest. Raises InvalidName with a reason users understand."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidName("model name is required")
    if not raw.isascii():  # before lower(): 'K' (KELVIN SIGN) would fold to 'k' and alias a model
        raise InvalidName(f"invalid model name {raw!r}: only ASCII letters, digits, '.', '_', '-', '/' "
                          "and ':' are allowed")
    text = raw.strip().lower()
    if len(text) > MAX_NAME:
        raise InvalidName(f"model name is longer than {MAX_NAME} characters")
    if any(c in text for c in ("\x00", "\\")) or ".." in text or text.startswith("/"):
        raise InvalidName(f"invalid model name {raw!r}: no '..', '\\', NUL or leading '/' allowed")
    name, sep, tag = text.rpartition(":")
    if not sep:
        name, tag = text, "latest"
    if not _NAME.match(name):
        raise InvalidName(f"invalid model name {raw!r}: use letters, digits, '.', '_', '-' and '/'")
    if not _TAG.match(tag):
        raise InvalidName(f"invalid model tag {tag!r} in {raw!r}")
    return ModelName(name, tag)
