"""Structured output and required tool calls through the clients people use, against the session
hippod with SmolLM2: ollama-python, openai-python and LangChain's ChatOllama. Schemas come from
pydantic and plain tool definitions that never set additionalProperties: only closing objects as
Ollama does keeps a small model from inventing keys. Each scenario runs 5 different requests at
once (the runner batches them) and all 5 must pass."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

PEOPLE = [("Alice", 30), ("Bob", 42), ("Chen", 25), ("Dara", 61), ("Emil", 19)]


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


WEATHER = {"type": "function", "function": {  # a plain tool: not strict, no additionalProperties
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo"]


def _each(fn, items) -> list:
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def _extract(name: str, age: int) -> str:
    return f"{name} is {age} years old. Give the name and age of this person as JSON."


def test_ollama_format_pydantic_schema_parses_into_the_model(hippod):
    client = ollama.Client(host=hippod.url)

    def ask(person):
        r = client.chat(model="smollm2", messages=[{"role": "user", "content": _extract(*person)}],
                        format=Person.model_json_schema(), options={"temperature": 0, "num_predict": 32})
        return r.done_reason, r.message.content

    for reason, content in _each(ask, PEOPLE):
        assert reason == "stop", content
        Person.model_validate_json(content)
        assert set(json.loads(content)) == {"name", "age"}


def test_openai_required_tool_choice_returns_arguments_that_validate(hippod):
    client = openai.OpenAI(base_url=hippod.url + "/v1", api_key="unused", max_retries=0)

    def ask(city):
        return client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"What is the weather in {city}?"}],
            tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=40)

    for r in _each(ask, CITIES[:3]):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert set(json.loads(call.function.arguments)) == {"city"}


def test_openai_required_call_cut_short_is_length_with_the_partial_call(hippod):
    """The token limit inside the call: finish_reason "length", the call so far, no content."""
    client = openai.OpenAI(base_url=hippod.url + "/v1", api_key="unused", max_retries=0)
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Weather in Oslo?"}],
               tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=14)
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)  # really cut short
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.arguments for tc in streamed] == [call.function.arguments]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_langchain_chat_ollama_with_structured_output_json_schema(hippod):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="smollm2", base_url=hippod.url, temperature=0, num_predict=32)
    structured = llm.with_structured_output(Person, method="json_schema", include_raw=True)
    answers = structured.batch([_extract(*p) for p in PEOPLE], config={"max_concurrency": 5})
    assert len(answers) == 5
    for a in answers:
        assert a["parsing_error"] is None and isinstance(a["parsed"], Person), a
        assert set(json.loads(a["raw"].content)) == {"name", "age"}  # pydantic would drop extras


def test_greedy_tokens_do_not_depend_on_the_cache_or_the_batch(hippod):
    """The same greedy request cold, after a prompt-cache hit, and inside a batch."""
    client = openai.OpenAI(base_url=hippod.url + "/v1", api_key="unused", max_retries=0)

    def ask(text: str):
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "system", "content": "Answer in one sentence."},
                                       {"role": "user", "content": text}],
            temperature=0, max_tokens=10)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    question = "Why is the sky blue on a clear afternoon in late spring?"
    cold, cold_cached = ask(question)
    warm, warm_cached = ask(question)
    together = _each(ask, [question, "Name a fruit."])
    assert warm_cached > cold_cached
    assert warm == cold and together[0][0] == cold
