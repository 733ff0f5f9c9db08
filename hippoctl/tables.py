"""How hippoctl shows things: column tables and human sizes, times and durations, as `ollama` does.

The formats follow ollama's format package (HumanBytes, HumanTime, HumanNumber) and Go's
time.Duration, so output and scripts written against `ollama list` / `ollama ps` carry over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone

PADDING = "    "  # between columns, as ollama's tables


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Left-aligned columns, each as wide as its widest cell, no trailing blanks."""
    cells = [[str(c) for c in headers]] if headers else []
    cells += [[("" if c is None else str(c)) for c in row] for row in rows]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append((indent + PADDING.join(padded)).rstrip())
    return "\n".join(lines)


_BYTE_UNITS = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))


def human_bytes(n: int | float | None) -> str:
    """101945635 -> "101 MB", 4.7e9 -> "4.7 GB" (decimal units, like ollama)."""
    if n is None:
        return ""
    for unit, size in _BYTE_UNITS:
        if n >= size:
            value = n / size
            if value >= 10 or value == math.trunc(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{int(n)} B"


def human_number(n: int | float | None) -> str:
    """135000000 -> "135M", 1.24e9 -> "1.2B", 8e9 -> "8B" (ollama's HumanNumber)."""
    if n is None:
        return ""
    for unit, size, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == math.floor(value) else f"{value:.{decimals}f}{unit}"
    return str(int(n))


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time from the API (any fraction length, "Z" or an offset); None if absent."""
    if not text:
        return None
    text = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    date, sep, rest = text.partition(".")
    if sep:  # Python takes at most 6 fractional digits; Go sends up to 9
        digits = len(rest) - len(rest.lstrip("0123456789"))
        rest = rest[:min(digits, 6)] + rest[digits:]
        text = f"{date}.{rest}" if rest[:1].isdigit() else date + rest
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def human_duration(seconds: float) -> str:
    """"2 minutes", "About an hour", "3 days" (ollama's humanDuration)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def human_time(when: datetime | None, zero: str = "Never", now: datetime | None = None) -> str:
    """"2 minutes ago", "4 minutes from now", "Forever" for times decades ahead (keep_alive < 0)."""
    if when is None:
        return zero
    now = now or datetime.now(timezone.utc)
    delta = (now - when).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def go_duration(ns: int | float) -> str:
    """Nanoseconds as Go prints a time.Duration: "1.434127167s", "11.2ms", "2m3.5s" (ollama --verbose)."""
    ns = int(ns)
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = f"{hours}h" if hours else ""
    text += f"{minutes}m" if hours or minutes else ""
    return f"{sign}{text}{_decimal(rest, 10**9)}s"


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    digits = str(frac).zfill(len(str(unit)) - 1).rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)
