"""Ollama's keep_alive durations, shared by the settings check and the scheduler."""

from __future__ import annotations

import math
import re

FOREVER = float("inf")

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(value: object) -> float:
    """Ollama's keep_alive: seconds (number) or a Go duration ('5m', '1h30m', '-1m'); plain
    numbers in strings are seconds too. Negative = forever, 0 = unload when the request ends."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1 if text.startswith("-") else 1
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"invalid keep_alive duration {value!r} (use e.g. 5m, 30s, 1h, -1)") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError(f"invalid keep_alive {value!r}")
    return FOREVER if seconds < 0 else seconds
