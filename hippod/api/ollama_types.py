"""Ollama wire shapes (docs/api.md): request parsing and response building, no behaviour."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from hippod.api import tooling
from hippod.api.errors import BadRequest
from hippod.api.fields import get, number_in
from hippod.store.records import ModelRecord

# option -> (type, min, max)
OPTIONS: dict[str, tuple[Any, float | None, float | None]] = {
    "temperature": (float, 0, 100), "top_p": (float, 0, 1), "top_k": (int, 0, None),
    "min_p": (float, 0, 1), "seed": (int, None, None), "num_predict": (int, -2, None),
    "num_ctx": (int, 1, 2**24), "repeat_penalty": (float, 0, 100), "repeat_last_n": (int, -1, None),
    "presence_penalty": (float, -100, 100), "frequency_penalty": (float, -100, 100),
}
# llama.cpp hardware knobs with no meaning on MLX: accepted and ignored, as they change no output.
IGNORED_OPTIONS = {"num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "numa",
                   "low_vram", "f16_kv", "vocab_only", "num_keep", "penalize_newline"}
# Sampling methods hippo does not implement: a non-default value is refused, never ignored.
REFUSED_OPTIONS = {"mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "tfs_z": 1.0,
                   "typical_p": 1.0}


def parse_options(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("options must be an object", param="options")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        label = f"options.{key}"
        if key in IGNORED_OPTIONS or value is None:
            continue
        if key in REFUSED_OPTIONS:
            if value != REFUSED_OPTIONS[key]:
                raise BadRequest(f"option {key} is not supported by hippo", param=label)
            continue
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise BadRequest("options.stop must be a string or a list of strings", param=label)
            if len(stops) > 16:
                raise BadRequest("options.stop allows at most 16 stop strings", param=label)
            out["stop"] = [s for s in stops if s]
            continue
        if key not in OPTIONS:
            raise BadRequest(f"unknown option {key!r}", param=label)
        typ, lo, hi = OPTIONS[key]
        v = get(raw, key, typ, prefix="options.")
        out[key] = number_in(v, label, lo, hi)
    return out


def parse_format(raw: Any) -> dict | None:
    """Ollama's `format`: "json" or a JSON schema object -> the runner's grammar request."""
    if raw is None or raw == "":
        return None
    if raw == "json":
        return {"json_object": True}
    if isinstance(raw, dict):
        tooling.check_schema(raw, "format")
        return {"json_schema": raw}
    raise BadRequest('format must be "json" or a JSON schema object', param="format")


@dataclass
class GenerateBody:
    model: str
    prompt: str
    system: str | None
    raw: bool
    stream: bool
    keep_alive: Any
    options: dict
    format: dict | None
    images: list | None
    suffix: str | None
    think: Any = None


def parse_generate(body: dict) -> GenerateBody:
    images = get(body, "images", list)
    if images:
        raise BadRequest("images are not supported: hippo serves text models only", param="images")
    suffix = get(body, "suffix", str)
    if suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    if get(body, "template", str):
        raise BadRequest("template overrides are not supported; the model's own chat template is used",
                         param="template")
    if get(body, "context", list):
        raise BadRequest("context (the deprecated token context) is not supported; use /api/chat",
                         param="context")
    return GenerateBody(
        model=get(body, "model", str, required=True),
        prompt=get(body, "prompt", str, ""),
        system=get(body, "system", str),
        raw=get(body, "raw", bool, False),
        stream=get(body, "stream", bool, True),
        keep_alive=body.get("keep_alive"),
        options=parse_options(body.get("options")),
        format=parse_format(body.get("format")),
        images=None,
        suffix=None,
        think=body.get("think"),
    )


_ROLES = ("system", "user", "assistant", "tool")


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list):
        raise BadRequest("messages must be a list", param="messages")
    out = []
    for i, m in enumerate(raw):
        label = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{label} must be an object", param=label)
        role = get(m, "role", str, required=True, prefix=f"{label}.")
        if role not in _ROLES:
            raise BadRequest(f"{label}.role must be one of {', '.join(_ROLES)}, got {role!r}", param=label)
        content = get(m, "content", str, "", prefix=f"{label}.")
        if m.get("images"):
            raise BadRequest("images are not supported: hippo serves text models only",
                             param=f"{label}.images")
        msg: dict[str, Any] = {"role": role, "content": content}
        calls = get(m, "tool_calls", list, prefix=f"{label}.")
        if calls:
            msg["tool_calls"] = [_parse_tool_call(c, f"{label}.tool_calls[{j}]") for j, c in enumerate(calls)]
        for extra in ("tool_name", "name", "tool_call_id"):
            if isinstance(m.get(extra), str):
                msg[extra] = m[extra]
        out.append(msg)
    return out


def _parse_tool_call(c: Any, label: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"{label} must be {{'function': {{'name': ..., 'arguments': {{...}}}}}}", param=label)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise BadRequest(f"{label}.function.arguments is not valid JSON", param=label) from None
    if not isinstance(args, dict):
        raise BadRequest(f"{label}.function.arguments must be an object", param=label)
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def parse_tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("tools must be a list", param="tools")
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                             param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                             param=f"tools[{i}]")
    return raw or None


@dataclass
class ChatBody:
    model: str
    messages: list[dict]
    tools: list[dict] | None
    stream: bool
    keep_alive: Any
    options: dict
    format: dict | None


def parse_chat(body: dict) -> ChatBody:
    return ChatBody(
        model=get(body, "model", str, required=True),
        messages=parse_messages(body.get("messages", [])),
        tools=parse_tools(body.get("tools")),
        stream=get(body, "stream", bool, True),
        keep_alive=body.get("keep_alive"),
        options=parse_options(body.get("options")),
        format=parse_format(body.get("format")),
    )


# -- responses --------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def details(rec: ModelRecord) -> dict:
    return {"parent_model": "", "format": "gguf" if rec.format == "gguf" else "safetensors",
            "family": rec.family or "", "families": [rec.family] if rec.family else None,
            "parameter_size": rec.parameter_size or "", "quantization_level": rec.quantization or ""}


def tag_entry(rec: ModelRecord) -> dict:
    return {"name": rec.name, "model": rec.name, "modified_at": iso(rec.modified_at),
            "size": rec.size, "digest": rec.digest, "details": details(rec)}


@dataclass
class Timings:
    total: float
    load: float
    prompt_tokens: int
    prompt_seconds: float
    eval_tokens: int
    eval_seconds: float
    extra: dict = field(default_factory=dict)

    def as_ns(self) -> dict:
        ns = lambda s: int(max(s, 0) * 1e9)  # noqa: E731
        return {"total_duration": ns(self.total), "load_duration": ns(self.load),
                "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": ns(self.prompt_seconds),
                "eval_count": self.eval_tokens, "eval_duration": ns(self.eval_seconds), **self.extra}
