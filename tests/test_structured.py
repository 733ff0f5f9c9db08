"""Structured output and tools end to end: a real hippod, the `ollama` client, SmolLM2 and a
random-weight tiny llama (whose every valid answer is the grammar's doing)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import ollama
import pytest

from hippod.protocol import GenerateRequest
from tests.test_grammar_unit import CITY, WEATHER_TOOL, run_jobs

pytestmark = pytest.mark.slow

CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Delhi", "Lagos", "Quito", "Seoul",
          "Berlin", "Madrid", "Nairobi", "Hanoi", "Dublin", "Havana", "Kyiv", "Doha", "Perth", "Bern"]


def _parallel(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def test_ollama_format_schema_every_answer_validates_on_smollm2(hippod):
    """8 different prompts at once (the runner batches 4), half /api/chat, half /api/generate.
    (The tiny model's test below asks 20 of 20 through the API; on this real model each answer
    costs seconds of CPU.)"""
    opts = {"temperature": 0, "num_predict": 40}

    def ask(i: int) -> tuple[str, str]:
        client = ollama.Client(host=hippod.url)
        question = f"What is the population of {CITIES[i]}? Answer in JSON."
        if i % 2:
            r = client.chat(model="smollm2", messages=[{"role": "user", "content": question}],
                            format=CITY, options=opts)
            return r.message.content, r.done_reason
        if i % 4 == 0:  # streamed: the chunks join into the document
            parts = list(client.generate(model="smollm2", prompt=question, format=CITY, options=opts,
                                         stream=True))
            return "".join(p.response for p in parts), parts[-1].done_reason
        r = client.generate(model="smollm2", prompt=question, format=CITY, options=opts)
        return r.response, r.done_reason

    answers = _parallel(ask, range(8))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), CITY)
    assert len({t for t, _ in answers}) > 4


def test_ollama_format_json_gives_an_object(hippod):
    r = ollama.Client(host=hippod.url).generate(
        model="smollm2", prompt="Describe a cat as JSON with the keys name and color.", format="json",
        options={"temperature": 0, "num_predict": 48})
    assert r.done_reason == "stop", r.response
    assert isinstance(json.loads(r.response), dict)


@pytest.mark.parametrize("fmt,fragment", [
    ({"type": "strin"}, "format"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "format"),
    ("yaml", "format must be"),
    (42, "format must be"),
])
def test_ollama_bad_format_is_400(hippod, fmt, fragment):
    for path, body in (("/api/generate", {"prompt": "hi"}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]})):
        status, resp = hippod.request("POST", path, {"model": "smollm2", "format": fmt, **body})
        assert status == 400, resp
        assert fragment in resp["error"], resp


def test_ollama_tools_round_trip(hippod):
    """Tools reach the model (SmolLM2's template has none: hippo adds them to the system prompt);
    a call comes back as an object; the tool's result sent back yields an assistant answer."""
    client = ollama.Client(host=hippod.url)
    opts = {"temperature": 0, "num_predict": 40}
    question = {"role": "user", "content": "What is the weather in Paris? Use the tool."}
    r = client.chat(model="smollm2", messages=[question], tools=[WEATHER_TOOL], options=opts)
    assert r.done_reason == "stop" and r.message.role == "assistant"
    for call in r.message.tool_calls or []:  # free choice: the model may call or answer
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict)
    assert r.message.tool_calls or r.message.content

    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    messages = [question, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_name": "get_weather", "content": "22 degrees and sunny"}]
    r = client.chat(model="smollm2", messages=messages, tools=[WEATHER_TOOL], options=opts)
    assert r.message.role == "assistant" and r.done
    assert r.message.content.strip() or r.message.tool_calls
    streamed = list(client.chat(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                options=opts, stream=True))
    assert streamed[-1].done
    joined = "".join(c.message.content for c in streamed)
    assert joined == r.message.content


def test_show_lists_tools_capability(hippod):
    status, body = hippod.request("POST", "/api/show", {"model": "smollm2"})
    assert status == 200 and "tools" in body["capabilities"]


# -- a random model behind the API: only the grammar can make it valid ----------------------------


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory, tiny_model_dir):
    from tests.daemon import Daemon

    with Daemon(tmp_path_factory.mktemp("tiny-home"),
                env={"HIPPO_NUM_PARALLEL": "4", "HIPPO_NUM_CTX": "1024"}) as d:
        status, body = d.request("POST", "/api/create",
                                 {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
        assert status == 200, body
        yield d


def test_tiny_model_format_schema_20_of_20_through_the_api(tiny_daemon):
    def ask(i: int) -> tuple[str, str]:
        status, r = tiny_daemon.request("POST", "/api/generate", {
            "model": "tiny", "prompt": f"city {i}", "format": CITY, "stream": False,
            "options": {"temperature": 1.0, "seed": i, "num_predict": 96}})
        assert status == 200, r
        return r["response"], r["done_reason"]

    answers = _parallel(ask, range(20))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), CITY)
    assert len({t for t, _ in answers}) > 10


def test_tiny_model_tool_calls_through_the_api(tiny_daemon):
    """Ollama has no tool_choice; a model that answers with a call's JSON gets tool_calls back.
    The random model will not, so its babble must come back as content, never as a call."""
    status, r = tiny_daemon.request("POST", "/api/chat", {
        "model": "tiny", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [WEATHER_TOOL], "stream": False, "options": {"temperature": 0, "num_predict": 12}})
    assert status == 200, r
    assert r["message"]["role"] == "assistant" and "tool_calls" not in r["message"]
    assert r["message"]["content"] and r["done_reason"] == "length"


# -- SmolLM2 in-process: the OpenAI-side requests, as openai.py will build them --------------------


@pytest.fixture(scope="module")
def smol_loop():
    from mlx_lm import load

    from hippod.engine.batch_loop import BatchLoop
    from tests.modelfiles import smollm2_mlx_dir

    model, tokenizer = load(str(smollm2_mlx_dir()))
    return BatchLoop(model, tokenizer, num_parallel=4, context_length=2048, info=lambda n: None)


def test_openai_response_format_json_schema_on_smollm2(smol_loop):
    from hippod.api import tooling

    grammar = tooling.grammar_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": CITY}})
    reqs = [GenerateRequest(messages=[{"role": "user", "content": f"Population of {c}? JSON please."}],
                            grammar=grammar, options={"temperature": 0, "num_predict": 40})
            for c in CITIES[:4]]
    for r in run_jobs(smol_loop, reqs):
        assert r["done"].done_reason == "stop"
        jsonschema.validate(json.loads(r["text"]), CITY)


def test_named_tool_choice_round_trip_on_smollm2(smol_loop):
    """tool_choice names a function: the call validates; its result sent back yields an answer."""
    from hippod.api import tooling

    tools = [WEATHER_TOOL]
    choice = tooling.tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    question = {"role": "user", "content": "What is the weather like in Paris today?"}
    (r,) = run_jobs(smol_loop, [GenerateRequest(messages=[question], tools=tools, tool_choice=choice,
                                                options={"temperature": 0, "num_predict": 40})])
    assert r["text"] == "" and r["done"].done_reason == "stop"
    (call,) = r["done"].tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], WEATHER_TOOL["function"]["parameters"])

    (wire,) = tooling.openai_tool_calls(r["done"].tool_calls)
    assert wire["id"].startswith("call_") and json.loads(wire["function"]["arguments"]) == call["arguments"]
    history = [question, {"role": "assistant", "content": "", "tool_calls": [wire]},
               {"role": "tool", "tool_call_id": wire["id"], "name": "get_weather",
                "content": json.dumps({"temperature": 22, "sky": "sunny"})}]
    (r,) = run_jobs(smol_loop, [GenerateRequest(messages=history, tools=tools, tool_choice="auto",
                                                options={"temperature": 0, "num_predict": 24})])
    assert r["error"] is None and r["done"].tool_calls is None
    assert r["text"].strip()
