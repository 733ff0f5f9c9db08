"""OpenAI wire shapes: request parsing into hippo terms and response building, no behaviour.

Everything a client may send is either honoured, accepted as meaning nothing here (`user`,
`metadata`, ...), or refused with a 400 that names the parameter: a request is never silently
answered as if it had asked for something else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hippod import __version__
from hippod.api import request as common
from hippod.api import tooling
from hippod.api.errors import BadRequest
from hippod.api.fields import get, number_in
from hippod.protocol import GenerateRequest
from hippod.store.records import ModelRecord


# -- shared request parts ----------------------------------------------------------------------


def _refuse(body: dict, name: str, allowed, reason: str) -> None:
    """400 naming `name` unless its value is absent or one of the `allowed` harmless values."""
    value = body.get(name)
    if value is None or any(value == ok and type(value) is type(ok) for ok in allowed):
        return
    raise BadRequest(f"{name} {reason}", param=name)


def _refuse_common(body: dict) -> None:
    _refuse(body, "n", (1,), "must be 1: hippo returns one choice per request")
    _refuse(body, "logit_bias", ({},), "is not supported by hippo")
    _refuse(body, "store", (False,), "is not supported: hippo does not store completions")


def parse_sampling(body: dict, max_tokens_default: int | None) -> dict[str, Any]:
    """OpenAI sampling parameters -> the runner's Ollama-named options. What the client leaves
    out stays out, so the model's own defaults apply (api/defaults.py), not OpenAI's 1.0."""
    options: dict[str, Any] = {}
    for name, key, typ, lo, hi in (
        ("temperature", "temperature", float, 0, 2),
        ("top_p", "top_p", float, 0, 1),
        ("presence_penalty", "presence_penalty", float, -2, 2),
        ("frequency_penalty", "frequency_penalty", float, -2, 2),
        ("seed", "seed", int, None, None),
        # Not in OpenAI's API, but sent by many clients of local servers (vLLM, mlx-lm accept them).
        ("top_k", "top_k", int, 0, None),
        ("min_p", "min_p", float, 0, 1),
    ):
        value = number_in(get(body, name, typ), name, lo, hi)
        if value is not None:
            options[key] = value
    max_tokens = get(body, "max_completion_tokens", int)
    label = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, label = get(body, "max_tokens", int, max_tokens_default), "max_tokens"
    if max_tokens is not None:
        options["num_predict"] = number_in(max_tokens, label, 1, None)
    stops = common.parse_stop(body.get("stop"))
    if stops:
        options["stop"] = stops
    return options


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = get(body, "stream", bool, False)
    opts = get(body, "stream_options", dict, {})
    include_usage = get(opts, "include_usage", bool, False, prefix="stream_options.")
    return stream, stream and include_usage


def parse_response_format(raw: Any) -> dict | None:
    """`response_format` -> the runner's grammar request (None = free text)."""
    return tooling.grammar_from_response_format(raw)


def parse_tool_choice(raw: Any, tools: list[dict] | None) -> str | dict | None:
    """`tool_choice` checked against `tools` (the runner hides tools for "none" and forces a
    valid call for "required" or a named function)."""
    return tooling.tool_choice(raw, tools)


# reasoning_effort -> GenerateRequest.think: "none" turns thinking off, the rest set its effort.
_EFFORT = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "high"}


def parse_reasoning_effort(raw: Any, param: str = "reasoning_effort") -> bool | str | None:
    if raw is None:
        return None
    if raw not in _EFFORT:
        raise BadRequest(f"{param} must be one of {', '.join(_EFFORT)}", param=param)
    return _EFFORT[raw]


def parse_chat_logprobs(body: dict) -> int | None:
    """`logprobs: true` and `top_logprobs: 0..20` -> alternatives per token (None: off)."""
    on = get(body, "logprobs", bool, False)
    top = common.parse_top_logprobs(body.get("top_logprobs"))
    if top and not on:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return top if on else None


# -- /v1/chat/completions ---------------------------------------------------------------------

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_MEDIA_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio", "file": "file",
                "input_file": "file"}
TEXT_PARTS = ("text", "refusal")


def content_text(raw: Any, label: str, text_parts: tuple[str, ...] = TEXT_PARTS) -> str:
    """Message content: a string, null, or a list of text parts joined as mlx-lm joins them.
    (The Responses API names its parts input_text / output_text; their text is under "text".)"""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise BadRequest(f"{label} must be a string or a list of content parts", param=label)
    texts = []
    for j, part in enumerate(raw):
        plabel = f"{label}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise BadRequest(f"{plabel}: {_MEDIA_PARTS[kind]} content is not supported: hippo serves "
                             "text models only", param=plabel)
        if kind not in text_parts:
            raise BadRequest(f"{plabel} must be a content part of type '{text_parts[0]}'", param=plabel)
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise BadRequest(f"{plabel}.{kind} must be a string", param=f"{plabel}.{kind}")
        texts.append(text)
    return "".join(texts)


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for templates that want it
    for i, m in enumerate(raw):
        label = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{label} must be an object", param=label)
        role = get(m, "role", str, required=True, prefix=f"{label}.")
        if role not in _ROLES:
            raise BadRequest(f"{label}.role must be one of {', '.join(_ROLES)}, got {role!r}",
                             param=f"{label}.role")
        msg: dict[str, Any] = {"role": _ROLES[role],
                               "content": content_text(m.get("content"), f"{label}.content")}
        if role == "assistant":
            calls = get(m, "tool_calls", list, [], prefix=f"{label}.")
            if calls:
                msg["tool_calls"] = [common.history_tool_call(c, f"{label}.tool_calls[{j}]")
                                     for j, c in enumerate(calls)]
                call_names.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"] if "id" in c)
        if role == "tool":
            call_id = get(m, "tool_call_id", str, prefix=f"{label}.")
            if call_id:
                msg["tool_call_id"] = call_id
                if call_id in call_names:
                    msg["name"] = call_names[call_id]
            reasoning = get(m, "reasoning_content", str, prefix=f"{label}.")
            if reasoning:  # earlier thinking, which thinking models' templates render or drop
                msg["reasoning_content"] = reasoning
        name = get(m, "name", str, prefix=f"{label}.")
        if name:
            msg["name"] = name
        out.append(msg)
    return out


@dataclass
class Call:
    """One OpenAI generation request, translated: the runner's request plus delivery."""

    model: str
    stream: bool
    include_usage: bool
    keep_alive: Any  # hippo extension, as in Ollama's API
    request: GenerateRequest


def parse_chat(body: dict) -> Call:
    _refuse_common(body)
    _refuse(body, "audio", (), "output is not supported: hippo serves text models only")
    _refuse(body, "prediction", (), "(predicted outputs) is not supported by hippo")
    _refuse(body, "web_search_options", (), "is not supported: hippo has no web search")
    for name in ("functions", "function_call"):
        _refuse(body, name, ([],), "is deprecated and not supported; use tools and tool_choice")
    modalities = get(body, "modalities", list, [])
    if any(m != "text" for m in modalities):
        raise BadRequest("modalities: only 'text' is supported", param="modalities")
    get(body, "user", str)
    get(body, "metadata", dict)
    get(body, "parallel_tool_calls", bool)
    get(body, "service_tier", str)
    stream, include_usage = parse_stream(body)
    tools = common.parse_tools(body.get("tools"))
    request = GenerateRequest(
        messages=parse_messages(body.get("messages")), tools=tools,
        tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
        grammar=parse_response_format(body.get("response_format")),
        options=parse_sampling(body, max_tokens_default=None), logprobs=parse_chat_logprobs(body),
        think=parse_reasoning_effort(body.get("reasoning_effort")))
    return Call(get(body, "model", str, required=True), stream, include_usage,
                body.get("keep_alive"), request)


# -- /v1/completions --------------------------------------------------------------------------


def parse_prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw):
        raise BadRequest("prompt: hippo completes one prompt per request; send a string or a list "
                         "of one string", param="prompt")
    if isinstance(raw, list):
        raise BadRequest("prompt must be a string: hippo takes the text, not token ids or nested lists",
                         param="prompt")
    if not isinstance(raw, str):
        raise BadRequest("prompt is required and must be a string", param="prompt")
    if not raw:
        raise BadRequest("prompt must not be empty", param="prompt")
    return raw


def parse_completion(body: dict) -> Call:
    _refuse_common(body)
    _refuse(body, "echo", (False,), "is not supported by hippo")
    _refuse(body, "suffix", ("",), "(fill-in-the-middle) is not supported by hippo")
    _refuse(body, "best_of", (1,), "must be 1: hippo returns one choice per request")
    get(body, "user", str)
    logprobs = number_in(get(body, "logprobs", int), "logprobs", 0, 5)  # legacy: an int, 0..5
    stream, include_usage = parse_stream(body)
    request = GenerateRequest(prompt=parse_prompt(body.get("prompt")), raw=True,
                              options=parse_sampling(body, max_tokens_default=16),  # OpenAI's default
                              logprobs=logprobs)
    return Call(get(body, "model", str, required=True), stream, include_usage,
                body.get("keep_alive"), request)


# -- /v1/embeddings ---------------------------------------------------------------------------


@dataclass
class EmbeddingsBody:
    model: str
    inputs: list[str]
    encoding_format: str
    dimensions: int | None
    keep_alive: Any


def parse_embeddings(body: dict) -> EmbeddingsBody:
    inputs = common.parse_embed_inputs(body.get("input"))
    fmt = get(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    get(body, "user", str)
    return EmbeddingsBody(
        model=get(body, "model", str, required=True),
        inputs=inputs,
        encoding_format=fmt,
        dimensions=number_in(get(body, "dimensions", int), "dimensions", 1, None),
        keep_alive=body.get("keep_alive"),
    )


# -- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def fingerprint(digest: str) -> str:
    """Changes exactly when the weights or hippo change, which is what clients use it for."""
    return "fp_" + hashlib.sha256(f"hippo {__version__} {digest}".encode()).hexdigest()[:10]


def finish_reason(done_reason: str) -> str:
    return "length" if done_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          drafted: int = 0, accepted: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if drafted:  # speculative decoding, in OpenAI's own words for predicted tokens
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": max(drafted - accepted, 0)}
    return out


@dataclass
class Envelope:
    """What every response and chunk of one request repeats."""

    id: str
    object: str
    model: str
    system_fingerprint: str
    created: int = 0

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())

    def wrap(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": choices, **extra}


def assistant_message(text: str, tool_calls: list[dict] | None = None, thinking: str = "") -> dict:
    """The finished assistant message, with the tool calls the runner parsed from the output and
    the reasoning in `reasoning_content` (the name DeepSeek's API, vLLM and LM Studio use)."""
    msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if thinking:
        msg["reasoning_content"] = thinking
    if tool_calls:
        msg.update(content=text or None, tool_calls=tooling.openai_tool_calls(tool_calls))
    return msg


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """Runner entries are already chat-shaped: {token, logprob, bytes, top_logprobs: [...]}."""
    return None if entries is None else {"content": entries, "refusal": None}


def chat_completion(env: Envelope, text: str, reason: str, usage_: dict,
                    tool_calls: list[dict] | None = None, thinking: str = "",
                    logprobs: list[dict] | None = None) -> dict:
    # "length" with tool_calls: a required call cut short, its arguments the text written so far.
    finish = "tool_calls" if tool_calls and reason != "length" else reason
    return env.wrap([{"index": 0, "message": assistant_message(text, tool_calls, thinking),
                      "logprobs": chat_logprobs(logprobs), "finish_reason": finish}], usage=usage_)


def chat_delta(text: str, thinking: str = "") -> dict:
    delta: dict[str, Any] = {"content": text}
    if thinking:
        delta["reasoning_content"] = thinking
    return delta


def chat_closing_chunks(env: Envelope, reason: str, tool_calls: list[dict] | None,
                        with_usage: bool) -> list[dict]:
    """The end of a streamed chat: the tool calls as one delta, then the finish_reason."""
    if not tool_calls:
        return [chat_chunk(env, {}, reason, with_usage=with_usage)]
    calls = tooling.openai_tool_calls(tool_calls, streaming=True)
    return [chat_chunk(env, {"tool_calls": calls}, with_usage=with_usage),
            chat_chunk(env, {}, "length" if reason == "length" else "tool_calls",
                       with_usage=with_usage)]


def chat_chunk(env: Envelope, delta: dict, reason: str | None = None, with_usage: bool = False,
               logprobs: list[dict] | None = None) -> dict:
    extra = {"usage": None} if with_usage else {}
    return env.wrap([{"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                      "finish_reason": reason}], **extra)


def completion_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """The legacy completions shape: parallel lists, alternatives as {token: logprob} maps."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def text_completion(env: Envelope, text: str, reason: str, usage_: dict,
                    logprobs: list[dict] | None = None) -> dict:
    return env.wrap([{"index": 0, "text": text, "logprobs": completion_logprobs(logprobs),
                      "finish_reason": reason}], usage=usage_)


def completion_chunk(env: Envelope, text: str, reason: str | None = None, with_usage: bool = False,
                     logprobs: list[dict] | None = None, offset: int = 0) -> dict:
    extra = {"usage": None} if with_usage else {}
    return env.wrap([{"index": 0, "text": text, "logprobs": completion_logprobs(logprobs, offset),
                      "finish_reason": reason}], **extra)


def usage_chunk(env: Envelope, usage_: dict) -> dict:
    """stream_options.include_usage: the last chunk before [DONE], with no choices."""
    return env.wrap([], usage=usage_)


def model_entry(rec: ModelRecord) -> dict:
    created = int(rec.created_at.timestamp()) if rec.created_at else 0
    return {"id": rec.name, "object": "model", "created": created, "owned_by": "hippo"}


def encode_embedding(vector: list[float], fmt: str) -> list[float] | str:
    """base64 is little-endian float32, what the openai SDK decodes (and asks for by default)."""
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embedding_list(model: str, vectors: list[list[float]], fmt: str, prompt_tokens: int) -> dict:
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, fmt)}
                     for i, v in enumerate(vectors)],
            "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
