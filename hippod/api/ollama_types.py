"""Ollama wire shapes (docs/api.md): request parsing and response building, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from hippod.api import request as common
from hippod.api import tooling
from hippod.api.errors import BadRequest
from hippod.api.fields import get
from hippod.protocol import GenerateRequest
from hippod.store.records import ModelRecord

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
class Call:
    """One /api/generate or /api/chat request, translated: the runner's request plus delivery."""

    model: str
    stream: bool
    keep_alive: Any
    request: GenerateRequest

    @property
    def empty(self) -> bool:
        """Nothing to generate from: Ollama loads (or, with keep_alive 0, unloads) the model."""
        r = self.request
        return not r.messages and not r.prompt and not r.system


def _logprobs(body: dict) -> int | None:
    """`logprobs: true` with `top_logprobs: N` -> how many alternatives per token (None: off).
    A positive top_logprobs alone implies logprobs, as a client asking for them means it."""
    on = get(body, "logprobs", bool, False)
    top = common.parse_top_logprobs(body.get("top_logprobs"))
    return top if on or top else None


def parse_generate(body: dict) -> Call:
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
    for name in ("width", "height", "steps"):  # Ollama's experimental image generation
        if body.get(name) is not None:
            raise BadRequest(f"{name}: image generation is not supported: hippo serves text models only",
                             param=name)
    request = GenerateRequest(
        prompt=get(body, "prompt", str, ""), system=get(body, "system", str),
        raw=get(body, "raw", bool, False), options=common.parse_options(body.get("options")),
        grammar=parse_format(body.get("format")), logprobs=_logprobs(body),
        think=common.parse_think(body.get("think")))
    return Call(get(body, "model", str, required=True), get(body, "stream", bool, True),
                body.get("keep_alive"), request)


_ROLES = ("system", "user", "assistant", "tool")


def parse_messages(raw: Any, *, plain: bool = False) -> list[dict]:
    """A chat's messages. `plain`: a model's stored messages (/api/create), role and content
    only, since tool calls, thinking and names there would be replayed into every chat."""
    if not isinstance(raw, list):
        raise BadRequest("messages must be a list", param="messages")
    out = []
    for i, m in enumerate(raw):
        label = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{label} must be an object", param=label)
        extra = sorted(k for k in set(m) - {"role", "content"} if m.get(k)) if plain else []
        if extra:
            raise BadRequest(f"{label}.{extra[0]} is not supported in a model's messages",
                             param=f"{label}.{extra[0]}")
        role = get(m, "role", str, required=True, prefix=f"{label}.")
        if role not in _ROLES:
            raise BadRequest(f"{label}.role must be one of {', '.join(_ROLES)}, got {role!r}", param=label)
        content = get(m, "content", str, "", prefix=f"{label}.")
        if plain:
            out.append({"role": role, "content": content})
            continue
        if m.get("images"):
            raise BadRequest("images are not supported: hippo serves text models only",
                             param=f"{label}.images")
        msg: dict[str, Any] = {"role": role, "content": content}
        calls = get(m, "tool_calls", list, prefix=f"{label}.")
        if calls:
            msg["tool_calls"] = [common.history_tool_call(c, f"{label}.tool_calls[{j}]")
                                 for j, c in enumerate(calls)]
        thinking = get(m, "thinking", str, prefix=f"{label}.")
        if thinking:  # the name HF chat templates (Qwen3, DeepSeek-R1) read earlier thinking by
            msg["reasoning_content"] = thinking
        for extra in ("tool_name", "name", "tool_call_id"):
            if get(m, extra, str, prefix=f"{label}."):
                msg[extra] = m[extra]
        out.append(msg)
    return out


def parse_chat(body: dict) -> Call:
    request = GenerateRequest(
        messages=parse_messages(body.get("messages", [])), tools=common.parse_tools(body.get("tools")),
        options=common.parse_options(body.get("options")), grammar=parse_format(body.get("format")),
        logprobs=_logprobs(body), think=common.parse_think(body.get("think")))
    return Call(get(body, "model", str, required=True), get(body, "stream", bool, True),
                body.get("keep_alive"), request)


def parse_embed(body: dict) -> tuple[str, list[str], bool, dict, Any]:
    """/api/embed: (model, inputs, truncate, options, keep_alive)."""
    return (get(body, "model", str, required=True), common.parse_embed_inputs(body.get("input")),
            get(body, "truncate", bool, True), common.parse_options(body.get("options")),
            body.get("keep_alive"))

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


def error(message: str) -> dict:
    """Ollama's one error shape, for answers and for a line inside a broken-off stream."""
    return {"error": message}


def chunk(kind: str, model: str, text: str, thinking: str = "", logprobs: list | None = None) -> dict:
    """One streamed line of /api/chat (`kind` "chat") or /api/generate."""
    out: dict[str, Any] = {"model": model, "created_at": now_iso()}
    if kind == "chat":
        message = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        out["message"] = message
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    out["done"] = False
    if logprobs:
        out["logprobs"] = logprobs
    return out


def final_chunk(kind: str, model: str, done, timings: Timings, *, text: str = "", thinking: str = "",
                logprobs: list | None = None) -> dict:
    """The closing line (or the whole answer when not streaming): done_reason, timings, tool calls."""
    out = chunk(kind, model, text, thinking, logprobs)
    out.update(done=True, done_reason=done.done_reason, **timings.as_ns())
    if done.drafted:  # speculative decoding (hippo's addition to Ollama's final chunk)
        out.update(draft_count=done.drafted, draft_accepted_count=done.accepted)
    if done.tool_calls and kind == "chat":
        out["message"]["tool_calls"] = tooling.ollama_tool_calls(done.tool_calls)
    return out


def load_answer(kind: str, model: str, reason: str) -> dict:
    """The answer to an empty request, which only loads or unloads the model."""
    out: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True, "done_reason": reason}
    out.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    return out


def embed_answer(model: str, embeddings: list, total: float, load: float, prompt_tokens: int) -> dict:
    return {"model": model, "embeddings": embeddings, "total_duration": int(total * 1e9),
            "load_duration": int(load * 1e9), "prompt_eval_count": prompt_tokens}
