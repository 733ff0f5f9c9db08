"""Typed reads of request fields, each failure a BadRequest naming the field."""

from __future__ import annotations

from typing import Any

from hippod.api.errors import BadRequest

_MISSING = object()


def _type_name(t) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "an object"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def get(body: dict, name: str, typ, default: Any = _MISSING, *, required: bool = False,
        prefix: str = "") -> Any:
    label = f"{prefix}{name}"
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"{label} is required", param=label)
        return None if default is _MISSING else default
    value = body[name]
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise BadRequest(f"{label} must be {_type_name(typ)}, got {type(value).__name__}", param=label)
    return value


def number_in(value: float | int | None, name: str, lo: float | None = None, hi: float | None = None):
    if value is None:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be a finite number", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise BadRequest(f"{name} must be {rng}, got {value}", param=name)
    return value


def query_limit(query, default: int, most: int) -> int:
    """?limit=N of a listing route: an integer from 1 to `most`."""
    try:
        limit = int(query.get("limit", str(default)))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    if not 1 <= limit <= most:
        raise BadRequest(f"limit must be between 1 and {most}", param="limit")
    return limit
