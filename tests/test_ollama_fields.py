"""Every field Ollama's docs/api.md documents for /api/generate and /api/chat: honoured (with an
effect a test can see) or refused with a 400 that names it. None is silently dropped."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import SMOL

pytestmark = pytest.mark.slow
Q = "What is the capital of France?"
FAST = {"temperature": 0, "num_predict": 3}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look up a place",
                                           "parameters": {"type": "object", "properties": {}}}}]


def _post(hippod, path: str, body: dict):
    status, got = hippod.request("POST", path, {"model": "smollm2", "stream": False, **body})
    return status, got


def _ok(hippod, path: str, body: dict) -> dict:
    status, got = _post(hippod, path, body)
    assert status == 200, got
    return got


def _prompt_tokens(hippod, path: str, body: dict) -> int:
    return _ok(hippod, path, {"options": {"temperature": 0, "num_predict": 1}, **body})["prompt_eval_count"]


CHAT = {"messages": [{"role": "user", "content": Q}]}
GEN = {"prompt": Q}


@pytest.mark.parametrize("path, field, body, fragment", [
    ("/api/generate", "suffix", {**GEN, "suffix": "end"}, "suffix"),
    ("/api/generate", "images", {**GEN, "images": ["aGk="]}, "images"),
    ("/api/generate", "template", {**GEN, "template": "{{ .Prompt }}"}, "template"),
    ("/api/generate", "context", {**GEN, "context": [1, 2, 3]}, "context"),
    ("/api/generate", "think", {**GEN, "think": True}, "think"),
    ("/api/generate", "width", {**GEN, "width": 512}, "width"),
    ("/api/generate", "height", {**GEN, "height": 512}, "height"),
    ("/api/generate", "steps", {**GEN, "steps": 4}, "steps"),
    ("/api/generate", "top_logprobs", {**GEN, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/api/generate", "keep_alive", {**GEN, "keep_alive": "soon"}, "keep_alive"),
    ("/api/generate", "format", {**GEN, "format": "xml"}, "format"),
    ("/api/generate", "options", {**GEN, "options": {"mirostat": 2}}, "mirostat"),
    ("/api/chat", "messages[].images", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "images"),
    ("/api/chat", "think", {**CHAT, "think": "always"}, "think"),
    ("/api/chat", "tools", {**CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    ("/api/chat", "messages[].tool_calls", {"messages": [{"role": "assistant", "content": "",
                                                          "tool_calls": [{"function": {"name": 3}}]}]},
     "tool_calls[0]"),
])
def test_refused_with_a_400_naming_it(hippod, path, field, body, fragment):
    status, got = _post(hippod, path, body)
    assert status == 400, (field, got)
    assert fragment in got["error"], (field, got)


@pytest.mark.parametrize("path, base", [("/api/generate", GEN), ("/api/chat", CHAT)])
def test_model_prompt_messages_options(hippod, path, base):
    got = _ok(hippod, path, {**base, "options": {"temperature": 0, "num_predict": 8}})
    text = got.get("response") or got["message"]["content"]
    assert "Paris" in text and got["eval_count"] <= 8
    cut = _ok(hippod, path, {**base, "options": {"temperature": 0, "num_predict": 2}})
    assert cut["eval_count"] == 2 and cut["done_reason"] == "length"
    assert _post(hippod, path, {**base, "model": "nope-missing"})[0] == 404


@pytest.mark.parametrize("path, base", [("/api/generate", GEN), ("/api/chat", CHAT)])
def test_stream(hippod, path, base):
    import urllib.request

    req = urllib.request.Request(hippod.url + path, method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "smollm2", "options": FAST, **base}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert len(lines) >= 2 and lines[-1]["done"] and not any(x["done"] for x in lines[:-1])


@pytest.mark.parametrize("path, base", [("/api/generate", GEN), ("/api/chat", CHAT)])
def test_format(hippod, path, base):
    schema = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 12}}}
    for fmt in ("json", schema):
        got = _ok(hippod, path, {**base, "format": fmt, "options": {"temperature": 0, "num_predict": 24}})
        value = json.loads(got.get("response") or got["message"]["content"])
        assert isinstance(value, dict)


def test_generate_system_and_raw(hippod):
    plain = _prompt_tokens(hippod, "/api/generate", GEN)
    with_system = _prompt_tokens(hippod, "/api/generate", {**GEN, "system": "You answer in one word only."})
    raw = _prompt_tokens(hippod, "/api/generate", {**GEN, "raw": True})
    assert raw < plain  # no chat template around the prompt
    assert with_system != plain  # the system prompt replaced the template's default one


def test_chat_tools_and_history_fields(hippod):
    plain = _prompt_tokens(hippod, "/api/chat", CHAT)
    assert _prompt_tokens(hippod, "/api/chat", {**CHAT, "tools": TOOLS}) > plain  # the tools are shown
    history = {"messages": [
        {"role": "user", "content": "Look up Paris."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]},
        {"role": "tool", "content": '{"country": "France"}', "tool_name": "lookup"},
        {"role": "user", "content": Q}]}
    assert _prompt_tokens(hippod, "/api/chat", {**history, "tools": TOOLS}) > plain


@pytest.mark.parametrize("path, base", [("/api/generate", GEN), ("/api/chat", CHAT)])
def test_logprobs_and_top_logprobs(hippod, path, base):
    got = _ok(hippod, path, {**base, "options": FAST, "logprobs": True, "top_logprobs": 2})
    assert len(got["logprobs"]) == got["eval_count"]
    assert all(1 <= len(e["top_logprobs"]) <= 2 and e["logprob"] <= 0 for e in got["logprobs"])
    assert "logprobs" not in _ok(hippod, path, {**base, "options": FAST})


@pytest.mark.parametrize("path, base", [("/api/generate", GEN), ("/api/chat", CHAT)])
def test_keep_alive_and_think_false(hippod, path, base):
    _ok(hippod, path, {**base, "options": FAST, "keep_alive": "30m", "think": False})
    status, ps = hippod.request("GET", "/api/ps")
    (m,) = [m for m in ps["models"] if m["model"] == SMOL]
    expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(timezone.utc) + timedelta(minutes=25)
