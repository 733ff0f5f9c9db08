"""Parse an Ollama Modelfile into the fields of an /api/create request.

Instructions (case-insensitive, as in Ollama): FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE,
LICENSE, and ADAPTER (refused: hippo has no LoRA adapters). A value is the rest of the line,
a "quoted string", or a triple-quoted block that may span lines. `#` starts a comment line.
Relative FROM paths are resolved against the Modelfile's folder, as Ollama does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

INSTRUCTIONS = ("from", "parameter", "template", "system", "message", "license", "adapter")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class ModelfileError(ValueError):
    """A line the parser cannot accept; the message names the line and the problem."""


def _value(text: str, lines: list[str], index: int) -> tuple[str, int]:
    """The value starting at `text` (the rest of line `index`); returns it and the next line."""
    stripped = text.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        if '"""' in body:
            value, _, after = body.partition('"""')
            if after.strip():
                raise ModelfileError(f"line {index + 1}: text after the closing \"\"\"")
            return value, index + 1
        parts = [body]
        for j in range(index + 1, len(lines)):
            if '"""' in lines[j]:
                value, _, after = lines[j].partition('"""')
                if after.strip():
                    raise ModelfileError(f"line {j + 1}: text after the closing \"\"\"")
                parts.append(value)
                return "\n".join(parts), j + 1
            parts.append(lines[j])
        raise ModelfileError(f"line {index + 1}: unterminated \"\"\" block")
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        try:
            return json.loads(stripped), index + 1
        except ValueError:
            return stripped[1:-1], index + 1
    return stripped, index + 1


def _typed(value: str):
    """PARAMETER values keep their type: integers, numbers and booleans, else the string."""
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", value):
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _source(value: str, base: Path) -> str:
    expanded = os.path.expanduser(value)
    candidate = expanded if os.path.isabs(expanded) else str(base / expanded)
    if value.startswith(("/", "~", "./", "../")) or os.path.exists(candidate):
        return os.path.abspath(candidate)
    return value


def parse(text: str, base: Path) -> dict:
    """Modelfile text -> /api/create fields (`from`, `parameters`, `template`, ...)."""
    body: dict = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        word, _, rest = line.partition(" ")
        instruction = word.lower()
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(f"line {i + 1}: unknown instruction {word!r}")
        start = i
        if instruction == "parameter":
            name, _, raw = rest.strip().partition(" ")
            if not name or not raw.strip():
                raise ModelfileError(f"line {i + 1}: PARAMETER needs a name and a value")
            value, i = _value(raw, lines, i)
            params = body.setdefault("parameters", {})
            if name.lower() == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[name.lower()] = _typed(value)
        elif instruction == "message":
            role, _, raw = rest.strip().partition(" ")
            if role.lower() not in MESSAGE_ROLES:
                raise ModelfileError(f"line {i + 1}: MESSAGE role must be one of "
                                     f"{', '.join(MESSAGE_ROLES)}, not {role!r}")
            value, i = _value(raw, lines, i)
            body.setdefault("messages", []).append({"role": role.lower(), "content": value})
        else:
            if not rest.strip():
                raise ModelfileError(f"line {i + 1}: {word.upper()} needs a value")
            value, i = _value(rest, lines, i)
            if instruction == "adapter":
                raise ModelfileError(f"line {start + 1}: ADAPTER is not supported by hippo "
                                     "(no LoRA adapters)")
            if instruction == "from":
                body["from"] = _source(value, base)
            elif instruction == "license":
                body.setdefault("license", []).append(value)
            else:
                body[instruction] = value
    if "from" not in body:
        raise ModelfileError("the Modelfile has no FROM line")
    if len(body.get("license", [])) == 1:
        body["license"] = body["license"][0]
    return body


def parse_file(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelfileError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse(text, Path(path).resolve().parent)
