"""OpenAI Responses API wire shapes (/v1/responses): request parsing and the event stream.

Stateless: every request carries its whole conversation in `input`; nothing is stored, so
`previous_response_id`, `conversation` and `background` are refused with a 400 naming them.
Items translate into the same chat request the other APIs build: messages, function calls and
their outputs become the chat history; `instructions` the system message; function tools,
`tool_choice`, `text.format` and `reasoning.effort` the runner's tools, grammar and think.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hippod.api import openai_types
from hippod.api import request as common
from hippod.api import tooling
from hippod.api.errors import BadRequest, openai_error
from hippod.api.fields import get, number_in
from hippod.protocol import DoneEvent, GenerateRequest

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")  # their text is under "text"
_IGNORED = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
            "parallel_tool_calls", "max_tool_calls", "store", "include", "stream_options", "truncation")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _refuse(body: dict, name: str, why: str) -> None:
    if body.get(name) not in (None, False, [], {}):
        raise BadRequest(f"{name} {why}", param=name)


def _text(content: Any, label: str) -> str:
    return openai_types.content_text(content, label, _TEXT_PARTS)


def parse_input(raw: Any) -> list[dict]:
    """`input` (a string, or a list of items) -> chat messages, function calls grouped into the
    assistant turn that made them, as chat templates expect."""
    if isinstance(raw, str):
        if not raw:
            raise BadRequest("input must not be empty", param="input")
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("input must be a string or a non-empty list of items", param="input")
    messages: list[dict] = []
    names: dict[str, str] = {}
    for i, item in enumerate(raw):
        label = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{label} must be an object", param=label)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise BadRequest(f"{label}.role must be one of {', '.join(_ROLES)}", param=f"{label}.role")
            messages.append({"role": _ROLES[role], "content": _text(item.get("content"), f"{label}.content")})
        elif kind == "function_call":
            name = get(item, "name", str, required=True, prefix=f"{label}.")
            call_id = get(item, "call_id", str, required=True, prefix=f"{label}.")
            call = {"type": "function", "id": call_id, "function": {
                "name": name, "arguments": common.call_arguments(item.get("arguments"), f"{label}.arguments")}}
            names[call_id] = name
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or "tool_calls" not in last and last["content"]:
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id = get(item, "call_id", str, required=True, prefix=f"{label}.")
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{label}.output")
            msg = {"role": "tool", "content": text, "tool_call_id": call_id}
            if call_id in names:
                msg["name"] = names[call_id]
            messages.append(msg)
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: templates drop it from history anyway
        else:
            raise BadRequest(f"{label}: input items of type {kind!r} are not supported "
                             "(message, function_call, function_call_output, reasoning)", param=label)
    return messages


def parse_tools(raw: Any) -> list[dict] | None:
    """Responses tools are flat ({"type": "function", "name", "parameters"}); hosted tools
    (web_search, file_search, code_interpreter, ...) do not exist here."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("tools must be a list", param="tools")
    out = []
    for i, t in enumerate(raw):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise BadRequest(f"tools[{i}]: tools of type {kind!r} are not supported; only function tools",
                             param=f"tools[{i}]")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return common.parse_tools(out)


def parse_tool_choice(raw: Any, tools: list[dict] | None) -> str | dict | None:
    if isinstance(raw, dict) and raw.get("type") == "function":
        raw = {"type": "function", "function": {"name": raw.get("name")}}
    elif isinstance(raw, dict):
        raise BadRequest(f"tool_choice of type {raw.get('type')!r} is not supported", param="tool_choice")
    return tooling.tool_choice(raw, tools)


def parse_text_format(text: Any) -> dict | None:
    """`text.format` -> the runner's grammar request."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise BadRequest("text must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise BadRequest("text.format must be an object with a 'type'", param="text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"json_object": True}
    if fmt["type"] == "json_schema":
        schema = fmt.get("schema") or {"type": "object"}
        tooling.check_schema(schema, "text.format.schema")
        return {"json_schema": schema}
    raise BadRequest(f"text.format type {fmt['type']!r} is unknown; use text, json_object or json_schema",
                     param="text.format")


@dataclass
class Call(openai_types.Call):
    """A /v1/responses request: the shared call plus what the response object echoes back."""

    echo: dict = field(default_factory=dict)


def parse_responses(body: dict) -> Call:
    _refuse(body, "previous_response_id", "is not supported: hippo's Responses API is stateless; "
                                          "send the whole conversation in input")
    _refuse(body, "conversation", "is not supported: hippo's Responses API is stateless")
    _refuse(body, "background", "is not supported: hippo answers in the foreground")
    _refuse(body, "prompt", "(stored prompt templates) is not supported by hippo")
    for name in _IGNORED:  # typed, then ignored: they change nothing about a stateless local answer
        body.get(name)
    reasoning = get(body, "reasoning", dict, {})
    tools = parse_tools(body.get("tools"))
    messages = parse_input(body.get("input"))
    instructions = get(body, "instructions", str)
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    options: dict[str, Any] = {}
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = number_in(get(body, name, float), name, lo, hi)
        if value is not None:
            options[name] = value
    max_tokens = number_in(get(body, "max_output_tokens", int), "max_output_tokens", 1, None)
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    top = body.get("top_logprobs")
    request = GenerateRequest(
        messages=messages, tools=tools, tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
        grammar=parse_text_format(body.get("text")), options=options,
        logprobs=common.parse_top_logprobs(top) if top is not None else None,
        think=openai_types.parse_reasoning_effort(reasoning.get("effort"), "reasoning.effort"))
    call = Call(get(body, "model", str, required=True), get(body, "stream", bool, False), False,
                body.get("keep_alive"), request)
    call.echo = {
        "instructions": instructions, "max_output_tokens": max_tokens,
        "metadata": get(body, "metadata", dict, {}), "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": options.get("temperature"), "top_p": options.get("top_p"),
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "reasoning": {"effort": reasoning.get("effort"), "summary": None}, "top_logprobs": top,
        "truncation": body.get("truncation") or "disabled", "user": body.get("user"),
    }
    return call


class ResponseBuilder:
    """Builds the response object and, for a stream, the events that lead to it.

    `feed()` and `finish()` return the events to send; `response` is the object at any point
    (status in_progress until finish). Output items open lazily: reasoning first when the model
    thinks, then the message on its first text, then one item per tool call.
    """

    def __init__(self, model: str, echo: dict):
        self.seq = 0
        self.created = int(time.time())
        self.id = _new_id("resp")
        self.model = model
        self.echo = echo
        self.output: list[dict] = []
        self.reasoning: dict | None = None
        self.message: dict | None = None
        self.status = "in_progress"
        self.incomplete: dict | None = None
        self.usage: dict | None = None

    # -- objects ------------------------------------------------------------------------------

    @property
    def response(self) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created, "status": self.status,
                "error": None, "incomplete_details": self.incomplete, "model": self.model,
                "output": self.output, "previous_response_id": None, "store": False,
                "background": False, "usage": self.usage, **self.echo}

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]

    # -- streaming ----------------------------------------------------------------------------

    def feed(self, text: str, thinking: str = "", logprobs: list | None = None) -> list[dict]:
        events = []
        if thinking:
            if self.reasoning is None:
                self.reasoning = {"type": "reasoning", "id": _new_id("rs"), "summary": [],
                                  "content": [{"type": "reasoning_text", "text": ""}]}
                self.output.append(self.reasoning)
                events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                          item=self.reasoning))
            self.reasoning["content"][0]["text"] += thinking
            events.append(self._event("response.reasoning_text.delta", item_id=self.reasoning["id"],
                                      output_index=self.output.index(self.reasoning), content_index=0,
                                      delta=thinking))
        if text or logprobs:
            events += self._close_reasoning()
            if self.message is None:
                events += self._open_message()
            part = self.message["content"][0]
            part["text"] += text
            part["logprobs"].extend(logprobs or ())
            events.append(self._event("response.output_text.delta", item_id=self.message["id"],
                                      output_index=self.output.index(self.message), content_index=0,
                                      delta=text, logprobs=logprobs or []))
        return events

    def _open_message(self) -> list[dict]:
        self.message = {"type": "message", "id": _new_id("msg"), "status": "in_progress",
                        "role": "assistant", "content": []}
        self.output.append(self.message)
        index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [self._event("response.output_item.added", output_index=index,
                              item={**self.message, "content": []}),
                  self._event("response.content_part.added", item_id=self.message["id"],
                              output_index=index, content_index=0, part=dict(part, logprobs=[]))]
        self.message["content"].append(part)
        return events

    def _close_reasoning(self) -> list[dict]:
        r, self.reasoning = self.reasoning, None
        if r is None:
            return []
        index = self.output.index(r)
        return [self._event("response.reasoning_text.done", item_id=r["id"], output_index=index,
                            content_index=0, text=r["content"][0]["text"]),
                self._event("response.output_item.done", output_index=index, item=r)]

    def finish(self, done: DoneEvent) -> list[dict]:
        events = self._close_reasoning()
        if self.message is not None:
            m, index = self.message, self.output.index(self.message)
            part = m["content"][0]
            m["status"] = "completed"
            events += [self._event("response.output_text.done", item_id=m["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=part["logprobs"]),
                       self._event("response.content_part.done", item_id=m["id"], output_index=index,
                                   content_index=0, part=part),
                       self._event("response.output_item.done", output_index=index, item=m)]
        for call in tooling.openai_tool_calls(done.tool_calls or []):
            item = {"type": "function_call", "id": _new_id("fc"), "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                    "status": "completed"}
            self.output.append(item)
            index = len(self.output) - 1
            events += [self._event("response.output_item.added", output_index=index,
                                   item={**item, "arguments": "", "status": "in_progress"}),
                       self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=index, delta=item["arguments"]),
                       self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=index, name=item["name"], arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=index, item=item)]
        cut = done.done_reason == "length" and not done.tool_calls
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.usage = {"input_tokens": done.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": done.cached_tokens},
                      "output_tokens": done.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": done.prompt_tokens + done.completion_tokens}
        kind = "response.incomplete" if cut else "response.completed"
        return events + [self._event(kind, response=self.response)]

    def error(self, status: int, message: str, param: str | None) -> dict:
        """The stream's error event (the same fields as the error object of a failed request)."""
        err = openai_error_fields(status, message, param)
        return self._event("error", **err)


def openai_error_fields(status: int, message: str, param: str | None) -> dict:
    e = openai_error(status, message, param)["error"]
    return {"code": e["code"] or e["type"], "message": e["message"], "param": e["param"]}


def dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
