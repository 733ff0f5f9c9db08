"""Structured output and tool calls as both APIs hand them to the runner and get them back.

Requests: a grammar request ({"json_schema": S} or {"json_object": True}) and a tool_choice
("auto" | "none" | "required" | {"type": "function", "function": {"name": N}}), checked here
so a bad schema or choice is a 400 before any stream starts. The runner enforces them.
Answers: DoneEvent.tool_calls is [{"name", "arguments": {...}, "id"?}]; Ollama wants the
arguments as an object, OpenAI as a JSON string with a call id.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hippod.api.errors import BadRequest


def check_schema(schema: Any, param: str) -> None:
    """A 400 unless the runner can enforce `schema`: compiled by the runner's own entry point."""
    # Imported here, only when a request carries a schema: keeps daemon start-up lean.
    from hippod.engine.grammar import GrammarError, grammar_source

    if not isinstance(schema, dict):
        raise BadRequest(f"{param} must be a JSON schema object", param=param)
    try:
        grammar_source({"json_schema": schema})
    except GrammarError as e:
        raise BadRequest(f"{param}: {e}", param=param) from None


def check_grammar(grammar: dict | None, param: str) -> dict | None:
    if grammar and "json_schema" in grammar:
        check_schema(grammar["json_schema"], param)
    return grammar


def grammar_from_response_format(raw: Any) -> dict | None:
    """OpenAI `response_format` -> the runner's grammar request (None = free text)."""
    param = "response_format"
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise BadRequest("response_format must be an object with a 'type'", param=param)
    kind = raw["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequest("response_format.json_schema must be {'name': ..., 'schema': {...}}",
                             param="response_format.json_schema")
        # OpenAI lets the schema be omitted: then any JSON object will do.
        schema = spec.get("schema") or {"type": "object"}
        check_schema(schema, "response_format.json_schema.schema")
        return {"json_schema": schema}
    raise BadRequest(f"response_format type {kind!r} is unknown; use text, json_object or json_schema",
                     param=param)


def tool_choice(raw: Any, tools: list[dict] | None) -> str | dict | None:
    """OpenAI `tool_choice` checked against `tools`; the value GenerateRequest.tool_choice takes.

    A forced choice ("required" or a named function) compiles each tool's parameters, so a
    schema the grammar cannot enforce is refused here rather than mid-stream.
    """
    param = "tool_choice"
    if raw is None or raw in ("auto", "none"):
        return raw
    names = [t["function"]["name"] for t in tools or []]
    if raw == "required":
        chosen = names
    elif isinstance(raw, dict):
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if raw.get("type", "function") != "function" or not isinstance(name, str):
            raise BadRequest("tool_choice must be {'type': 'function', 'function': {'name': ...}}",
                             param=param)
        if name not in names:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", param=param)
        chosen, raw = [name], {"type": "function", "function": {"name": name}}
    else:
        raise BadRequest("tool_choice must be 'none', 'auto', 'required' or an object", param=param)
    if not chosen:
        raise BadRequest("tool_choice requires a call but no tools were given", param=param)
    for i, t in enumerate(tools or []):
        if t["function"]["name"] in chosen and t["function"].get("parameters") is not None:
            check_schema(t["function"]["parameters"], f"tools[{i}].function.parameters")
    return raw


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """Ollama's shape: arguments stay an object."""
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def openai_tool_calls(calls: list[dict], streaming: bool = False) -> list[dict]:
    """OpenAI's shape: an id per call and arguments as a JSON string (streamed chunks add index).

    A call cut short by the token limit already carries its arguments as the raw text so far.
    """
    out = []
    for i, c in enumerate(calls):
        args = c["arguments"]
        call = {"id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": c["name"], "arguments": args if isinstance(args, str)
                             else json.dumps(args, ensure_ascii=False)}}
        out.append({"index": i, **call} if streaming else call)
    return out
