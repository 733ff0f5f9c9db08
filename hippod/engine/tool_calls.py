"""Tool calls: prompt the model with the tools, force a call when asked to, parse calls out of text.

A model family that mlx_lm knows marks its calls (`<tool_call>...</tool_call>`, `[TOOL_CALLS]`,
...) and mlx_lm's parser for it reads them. Any other model is told in its system prompt to answer
with a bare JSON object `{"name": ..., "arguments": {...}}`, which the fallback parser reads.
When the client demands a call (tool_choice "required" or a named function), decoding is
constrained to exactly such an object, so the call is valid whatever the model would have said.
Such an answer is always a call: parsed, or at the token limit the call so far (`partial_call`),
or if it still does not parse an error saying why (`forced_failure`), never text.

Calls leave the runner as `{"name": str, "arguments": dict}` (plus "id" when the model gave one);
each API shapes them for its clients.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Any

from hippod.protocol import GenerateRequest

log = logging.getLogger("hippo.runner")

FALLBACK_OPEN, FALLBACK_CLOSE = "<tool_call>", "</tool_call>"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


# -- what the request asks for ------------------------------------------------------------------


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def forced_tool(req: GenerateRequest) -> tuple[bool, str | None]:
    """(must the answer be a call, the one function it must call or None for any of them).
    The API checked tool_choice against the tools (api/tooling.py); this only reads it."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "auto", "none"):
        return False, None
    if choice == "required":
        return True, None
    return True, choice["function"]["name"]


def uses_tools(req: GenerateRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """JSON schema of one call `{"name", "arguments"}`: to `name`, or to any of `tools`.

    Each tool's parameters sit inside it unchanged but for their local references, which are
    rewritten to point where the parameters now are (a pydantic model's `#/$defs/...`). The
    grammar closes their objects like any schema's.
    """
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]

    def one(fn: dict, at: str) -> dict:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object",
                "properties": {"name": {"const": fn["name"]},
                               "arguments": _moved_refs(params, f"{at}/properties/arguments")},
                "required": ["name", "arguments"], "additionalProperties": False}

    if len(chosen) == 1:
        return one(chosen[0], "#")
    return {"anyOf": [one(fn, f"#/anyOf/{i}") for i, fn in enumerate(chosen)]}


def _moved_refs(schema, root: str):
    """`schema` with each `$ref` to "#..." re-rooted at `root` (where the schema is placed)."""
    if isinstance(schema, list):
        return [_moved_refs(s, root) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = root + value[1:]
        elif key in ("const", "enum", "default", "examples"):
            out[key] = value  # values, not schemas
        else:
            out[key] = _moved_refs(value, root)
    return out


def forced_call_grammar(req: GenerateRequest) -> dict | None:
    forced, name = forced_tool(req)
    return {"json_schema": call_schema(req.tools, name), "compact": True} if forced else None


# -- the prompt -------------------------------------------------------------------------------


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return not isinstance(template, str) or "tools" in template


def fallback_instructions(tools: list[dict]) -> str:
    specs = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    return ("You can call these tools:\n" + specs + "\n"
            'To call a tool, answer with only a JSON object {"name": <tool name>, "arguments": '
            "{<argument name>: <value>}} and nothing else. Otherwise answer normally.")


def prepare_request(tokenizer, req: GenerateRequest) -> GenerateRequest:
    """The request as the chat template should see it.

    tool_choice "none" hides the tools. Tool-call arguments in the history become objects (HF
    templates expect them so). A template that ignores tools gets them in the system message,
    and past calls and results written as the text the model is asked to produce.
    """
    if req.tools and req.tool_choice == "none":
        req = replace(req, tools=None)
    if not req.messages and not req.tools:
        return req
    messages = [_normalized(m) for m in req.messages] if req.messages else req.messages
    if not req.tools or template_renders_tools(tokenizer):
        return replace(req, messages=messages)
    instructions = fallback_instructions(req.tools)
    if messages is None:  # prompt-style request: the prompt is the user turn
        if req.raw:
            return req
        system = f"{req.system}\n\n{instructions}" if req.system else instructions
        return replace(req, system=system, tools=None)
    messages = [_as_plain_turn(m) for m in messages]
    system = next((m for m in messages if m["role"] == "system"), None)
    if system is None and req.system:
        system = {"role": "system", "content": req.system}
        messages.insert(0, system)
    if system is None:
        messages.insert(0, {"role": "system", "content": instructions})
    else:
        system["content"] = f"{system['content']}\n\n{instructions}".lstrip()
    return replace(req, messages=messages, tools=None)


def _normalized(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for c in calls:
        fn = dict(c.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"] or "{}")
            except ValueError:
                pass
        out.append({**c, "function": fn})
    return {**message, "tool_calls": out}


def _as_plain_turn(message: dict) -> dict:
    if message.get("role") == "assistant" and message.get("tool_calls"):
        calls = [{"name": c["function"].get("name"), "arguments": c["function"].get("arguments", {})}
                 for c in message["tool_calls"]]
        text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        content = message.get("content") or ""
        return {"role": "assistant", "content": f"{content}\n{text}".strip()}
    if message.get("role") == "tool":
        name = message.get("tool_name") or message.get("name")
        label = f"Result of the tool {name}" if name else "Tool result"
        return {"role": "user", "content": f"{label}: {message.get('content') or ''}"}
    return {"role": message["role"], "content": message.get("content") or ""}


# -- parsing ----------------------------------------------------------------------------------


def _call(obj: Any, names: set[str]) -> dict | None:
    """`{"name", "arguments"}` (or Llama's "parameters"), arguments as an object; else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    call = {"name": obj["name"], "arguments": args}
    if isinstance(obj.get("id"), str):
        call["id"] = obj["id"]
    return call


def _calls(parsed: Any, names: set[str]) -> list[dict] | None:
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [_call(item, names) for item in items]
    return calls if calls and all(calls) else None


def parse_json_calls(text: str, tools: list[dict] | None = None) -> list[dict] | None:
    """The fallback: the whole answer is a call or a list of calls, maybe in tags or a code fence."""
    body = text.strip()
    if body.startswith(FALLBACK_OPEN):
        body = body[len(FALLBACK_OPEN):]
        body = body[: body.rfind(FALLBACK_CLOSE)] if FALLBACK_CLOSE in body else body
        body = body.strip()
    if m := _FENCE.match(body):
        body = m.group(1)
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return _calls(parsed, set(tool_names(tools)))


def parse_native_calls(text: str, tokenizer, tools: list[dict] | None
                       ) -> tuple[str, list[dict]]:
    """Calls in the family's own markup, read by mlx_lm's parser; returns (the rest, calls)."""
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end or ""
    names = set(tool_names(tools))
    content, calls, pos = [], [], 0
    while (i := text.find(start, pos)) >= 0:
        content.append(text[pos:i])
        body_start = i + len(start)
        j = text.find(end, body_start) if end else -1
        if j < 0:
            nxt = text.find(start, body_start)
            j = nxt if nxt >= 0 else len(text)
            pos = j
        else:
            pos = j + len(end)
        try:
            parsed = tokenizer.tool_parser(text[body_start:j], tools)
        except Exception as e:  # a truncated or malformed call: keep it as text
            log.info("could not parse a tool call: %s", e)
            content.append(text[i:pos])
            continue
        found = _calls(parsed, names)
        if found is None:
            content.append(text[i:pos])
        else:
            calls.extend(found)
    content.append(text[pos:])
    return "".join(content), calls


def parse_tool_calls(text: str, tokenizer, tools: list[dict] | None, *, strip: bool = True
                     ) -> tuple[str, list[dict] | None]:
    """(content, calls or None) for a finished answer; `strip` trims the text around calls."""
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_call_start in text:
        content, calls = parse_native_calls(text, tokenizer, tools)
        if calls:
            return (content.strip() if strip else content.rstrip()), calls
    calls = parse_json_calls(text, tools)
    return ("", calls) if calls else (text, None)


class ToolCallBuffer:
    """Streams the answer's plain text, holds back what may be a tool call, parses at the end.

    An answer that opens like a call (`{`, `[`, a code fence, `<tool_call>`, the family's start
    marker) is held whole; otherwise text streams until the family's start marker appears.
    With `forced`, the answer is the call, so nothing streams.
    """

    def __init__(self, tokenizer, tools: list[dict] | None, forced: bool = False):
        self.tokenizer = tokenizer
        self.tools = tools
        self.forced = forced
        native = tokenizer.tool_call_start if getattr(tokenizer, "has_tool_calling", False) else None
        self.native_start = native or None
        self.openers = [o for o in ("{", "[", "```", FALLBACK_OPEN, self.native_start) if o]
        self.streaming = False  # decided the answer is text (until a native start marker)
        self.held = ""  # text not sent yet
        self.sent = ""  # text already sent as content
        self.unparsed: str | None = None  # a forced call's text that did not parse

    def feed(self, text: str) -> str:
        self.held += text
        if self.forced:
            return ""
        if not self.streaming:
            head = self.held.lstrip()
            if not head or any(o.startswith(head) or head.startswith(o) for o in self.openers):
                return ""
            self.streaming = True
        return self._release()

    def _release(self) -> str:
        """Send held text up to a native start marker or a partial one at the end."""
        cut = len(self.held)
        if self.native_start:
            i = self.held.find(self.native_start)
            if i >= 0:
                cut = i
            else:
                for n in range(min(len(self.native_start) - 1, len(self.held)), 0, -1):
                    if self.held.endswith(self.native_start[:n]):
                        cut = len(self.held) - n
                        break
        out, self.held = self.held[:cut], self.held[cut:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(text still to send as content, the calls or None).

        A forced call that does not parse is never passed off as content: the text is kept in
        `unparsed` for `forced_failure` to describe.
        """
        held, self.held = self.held, ""
        if self.forced:
            calls = parse_json_calls(held, self.tools)
            if calls is None:
                self.unparsed = held
            return "", calls
        content, calls = parse_tool_calls(held, self.tokenizer, self.tools, strip=not self.sent)
        if calls is None:
            return held, None
        return content, calls


_PARTIAL_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)(")?')
_PARTIAL_ARGS = re.compile(r'\s*,\s*"arguments"\s*:\s*(.*)', re.DOTALL)


def partial_call(text: str) -> dict:
    """What a forced call cut short by the token limit had written: {"name", "arguments": text}.

    The grammar writes the name first, then the arguments, so both are read off the prefix; the
    arguments stay the raw JSON text so far (OpenAI reports a cut-short call the same way).
    """
    name = _PARTIAL_NAME.match(text)
    if name is None:
        return {"name": "", "arguments": ""}
    try:
        fn = json.loads(f'"{name.group(1)}"')
    except ValueError:  # cut inside an escape
        fn = name.group(1)
    args = _PARTIAL_ARGS.match(text, name.end()) if name.group(2) else None
    return {"name": fn, "arguments": args.group(1) if args else ""}


def forced_failure(text: str, tools: list[dict] | None) -> str:
    """Why a forced call that ran to its end did not parse (the grammar should make that rare)."""
    try:
        parsed = json.loads(text)
    except ValueError as e:
        return f"the required tool call is not valid JSON ({e}): {text[:200]!r}"
    return (f"the required tool call does not call one of the tools {tool_names(tools)} with "
            f"object arguments: {json.dumps(parsed)[:200]}")
