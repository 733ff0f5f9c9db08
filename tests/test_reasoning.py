"""Reasoning models: thinking apart from the answer on both APIs, `think`/`reasoning_effort` in the
template, tool calls after thinking. The model is a scripted Qwen3-shaped llama (tests/scripted_model)."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

from hippod.engine.thinking import Markers, ThinkingSplitter, starts_inside
from hippod.engine.tool_calls import ToolCallBuffer
from tests.scripted_model import make_scripted_thinker

LOOKUP = [{"type": "function", "function": {"name": "lookup", "description": "Look something up",
                                            "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def _stream(tokenizer, text: str) -> list[str]:
    """`text` as the runner sees it: token by token through mlx_lm's streaming detokenizer."""
    det = tokenizer.detokenizer
    det.reset()
    pieces = []
    for t in tokenizer.encode(text, add_special_tokens=False):
        det.add_token(t)
        pieces.append(det.last_segment)
    det.finalize()
    pieces.append(det.last_segment)
    return pieces


@pytest.fixture(scope="module")
def scripted_tokenizer(tmp_path_factory):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    d = make_scripted_thinker(tmp_path_factory.mktemp("tok") / "m", " Paris")
    return load_tokenizer(d)


@pytest.mark.parametrize("text, thinking, answer", [
    ("<think>\nLet me see.\n</think>\n\nParis is the capital.", "Let me see.\n", "Paris is the capital."),
    ("No thinking here.", "", "No thinking here."),
    ("<think></think>Short.", "", "Short."),
    ("<think>cut off before the end", "cut off before the end", ""),
])
def test_splitter_on_real_token_streams(scripted_tokenizer, text, thinking, answer):
    m = Markers(scripted_tokenizer.think_start, scripted_tokenizer.think_end)
    for pieces in (_stream(scripted_tokenizer, text), list(text)):  # by token, and by character
        s = ThinkingSplitter(m, inside=False)
        outs = [s.feed(p) for p in pieces] + [s.flush()]
        assert "".join(a for a, _ in outs) == answer
        assert "".join(t for _, t in outs) == thinking


def test_open_thinking_in_the_prompt_starts_inside(scripted_tokenizer):
    m = Markers("<think>", "</think>")
    enc = lambda s: scripted_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert starts_inside(scripted_tokenizer, enc("<|im_start|>assistant\n<think>\n"), m)  # R1-style
    assert not starts_inside(scripted_tokenizer, enc("assistant\n<think>\n\n</think>\n\n"), m)  # off
    assert not starts_inside(scripted_tokenizer, enc("<|im_start|>assistant\n"), m)
    s = ThinkingSplitter(m, inside=True)
    assert s.feed("still thinking</think>\n\nDone") == ("Done", "still thinking")


def test_harmony_channels_split(scripted_tokenizer):
    from hippod.engine.thinking import HARMONY_END, HARMONY_FINAL, HARMONY_THINK

    s = ThinkingSplitter(Markers(HARMONY_THINK, HARMONY_END, HARMONY_FINAL), inside=False)
    text = "<|channel|>analysis<|message|>User asks.<|end|><|start|>assistant<|channel|>final<|message|>Hi!"
    outs = [s.feed(c) for c in text] + [s.flush()]
    assert "".join(a for a, _ in outs) == "Hi!" and "".join(t for _, t in outs) == "User asks."


def test_tool_call_after_thinking_parses(scripted_tokenizer):
    text = '<think>I should look it up.</think>\n{"name": "lookup", "arguments": {"q": "Paris"}}'
    s = ThinkingSplitter(Markers("<think>", "</think>"), inside=False)
    tools = ToolCallBuffer(scripted_tokenizer, LOOKUP)
    thought, content = "", ""
    for piece in _stream(scripted_tokenizer, text):
        answer, t = s.feed(piece)
        thought += t
        content += tools.feed(answer)
    answer, t = s.flush()
    thought += t
    rest, calls = tools.finish()
    assert thought == "I should look it up." and content + tools.feed(answer) + rest == ""
    assert calls == [{"name": "lookup", "arguments": {"q": "Paris"}}]


# -- through the daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinker(hippod, tmp_path_factory) -> str:
    for name, answer in (("thinker", " Paris"), ("thinker-tool", '{"name":"lookup","arguments":{}}')):
        d = make_scripted_thinker(tmp_path_factory.mktemp(name) / name, answer)
        status, body = hippod.request("POST", "/api/create", {"model": name, "from": str(d),
                                                              "stream": False}, timeout=120)
        assert status == 200, body
    return "thinker"


@pytest.mark.slow
def test_ollama_thinking_apart_streamed_and_off(hippod, thinker):
    client = ollama.Client(host=hippod.url)
    opts = {"temperature": 0, "num_predict": 12}
    r = client.chat(model=thinker, messages=ASK, options=opts)
    assert (r.message.thinking, r.message.content) == ("Hmm", "Paris")
    parts = list(client.chat(model=thinker, messages=ASK, options=opts, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "Hmm"
    assert "".join(p.message.content for p in parts) == "Paris"
    off = client.chat(model=thinker, messages=ASK, options=opts, think=False)
    assert not off.message.thinking and off.message.content == "Paris"
    g = client.generate(model=thinker, prompt="Capital of France?", options=opts)
    assert (g.thinking, g.response) == ("Hmm", "Paris")
    # the earlier turn's thinking is accepted in the history
    again = client.chat(model=thinker, options=opts, messages=ASK + [
        {"role": "assistant", "content": "Paris", "thinking": "Hmm"}, {"role": "user", "content": "Sure?"}])
    assert again.message.content == "Paris"


@pytest.mark.slow
def test_openai_reasoning_content_and_effort(hippod, thinker):
    oai = openai.OpenAI(base_url=hippod.url + "/v1", api_key="x", max_retries=0)
    r = oai.chat.completions.create(model=thinker, messages=ASK, max_tokens=12, temperature=0)
    msg = r.choices[0].message
    assert msg.content == "Paris" and msg.model_extra["reasoning_content"] == "Hmm"
    chunks = list(oai.chat.completions.create(model=thinker, messages=ASK, max_tokens=12,
                                              temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Hmm"
    assert "".join(d.content or "" for d in deltas) == "Paris"
    off = oai.chat.completions.create(model=thinker, messages=ASK, max_tokens=12, temperature=0,
                                      reasoning_effort="none")
    assert off.choices[0].message.content == "Paris"
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})


@pytest.mark.slow
def test_tool_call_from_a_thinking_model(hippod, thinker):
    client = ollama.Client(host=hippod.url)
    r = client.chat(model="thinker-tool", messages=ASK, tools=LOOKUP,
                    options={"temperature": 0, "num_predict": 20})
    assert r.message.thinking == "Hmm" and not r.message.content
    assert [(c.function.name, c.function.arguments) for c in r.message.tool_calls] == [("lookup", {})]


@pytest.mark.slow
def test_think_on_a_model_that_cannot_is_a_400(hippod):
    status, body = hippod.request("POST", "/api/chat", {"model": "smollm2", "messages": ASK,
                                                        "think": True, "stream": False})
    assert status == 400 and "think" in body["error"], body
    status, body = hippod.request("POST", "/api/chat", {"model": "smollm2", "messages": ASK,
                                                        "think": "sometimes"})
    assert status == 400 and "think" in body["error"]
    status, body = hippod.request("POST", "/api/chat", {"model": "smollm2", "messages": ASK, "think": False,
                                                        "stream": False, "options": {"num_predict": 1}})
    assert status == 200, body
    json.dumps(body)
