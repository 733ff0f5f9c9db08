"""The OpenAI API, judged by the official `openai` package against a real daemon and model."""

from __future__ import annotations

import base64
import math
import json
import struct
import time

import openai
import pytest

from tests.conftest import SMOL

GREEDY = {"temperature": 0, "seed": 7}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(hippod) -> openai.OpenAI:
    # No retries: a 5xx must show up as a failure, not be papered over.
    return openai.OpenAI(base_url=hippod.url + "/v1", api_key="x", max_retries=0, timeout=300)


def _busy(hippod) -> int:
    status, body = hippod.request("GET", "/api/ps")
    assert status == 200, body
    return sum(m["hippo"]["busy"] for m in body["models"])


# -- models -----------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert SMOL in ids
    entry = next(m for m in listed.data if m.id == SMOL)
    assert entry.object == "model" and entry.owned_by == "hippo" and entry.created > 1_600_000_000
    for name in (SMOL, "smollm2"):  # both spellings name the same model
        got = client.models.retrieve(name)
        assert got.id == SMOL and got.created == entry.created


def test_unknown_model_is_not_found(client, hippod):
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=FRANCE, max_tokens=4)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    status, body = hippod.request("GET", "/v1/models/bad..name")
    assert status == 404 and body["error"]["code"] == "model_not_found"


# -- refused inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"stop": [1, 2]}, "stop"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
])
def test_chat_refuses_unsupported_parameters(client, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=2, extra_body=extra)
    assert exc.value.param == param
    assert exc.value.type == "invalid_request_error"


def test_chat_refuses_image_content(client):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=SMOL, messages=messages, max_tokens=4)
    assert exc.value.param == "messages[0].content[1]"
    assert "image" in exc.value.message


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": SMOL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": SMOL, "messages": [{"role": "wizard", "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": FRANCE}, "model"),
    ("/v1/chat/completions", {"model": "../x", "messages": FRANCE}, "model"),
    ("/v1/completions", {"model": SMOL, "prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"model": SMOL, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": SMOL, "prompt": "a", "echo": True}, "echo"),
    ("/v1/completions", {"model": SMOL, "prompt": "a", "suffix": "b"}, "suffix"),
    ("/v1/completions", {"model": SMOL, "prompt": "a", "n": 3}, "n"),
    ("/v1/embeddings", {"model": SMOL, "input": [[1, 2], [3]]}, "input"),
    ("/v1/embeddings", {"model": SMOL, "input": "a", "encoding_format": "int8"}, "encoding_format"),
])
def test_raw_bad_requests_name_the_param(hippod, path, body, param):
    status, got = hippod.request("POST", path, body)
    assert status == 400, got
    assert got["error"]["param"] == param
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_an_openai_400(hippod, raw):
    status, got = hippod.request("POST", "/v1/chat/completions", raw)
    assert status == 400
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == "invalid_request_error"


def test_daemon_survives_bad_inputs(hippod, client):
    for raw in (b"{", b"null", b'{"model": 5, "messages": {}}', b'{"model": "x", "prompt": {}}'):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            status, _ = hippod.request("POST", path, raw)
            assert status in (400, 404)
    assert hippod.proc.poll() is None
    assert SMOL in [m.id for m in client.models.list().data]


# -- chat -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_non_stream_and_stream_agree(client):
    whole = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=12, **GREEDY)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.model == SMOL and whole.system_fingerprint.startswith("fp_")
    assert whole.created > 1_600_000_000
    (choice,) = whole.choices
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = whole.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    chunks = list(client.chat.completions.create(
        model=SMOL, messages=FRANCE, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last, usage_chunk = chunks
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == choice.message.content
    assert last.choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content)
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens,
            usage_chunk.usage.total_tokens) == (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.slow
def test_chat_stop_and_length(client):
    cut = client.chat.completions.create(model=SMOL, messages=FRANCE, max_completion_tokens=2,
                                         **GREEDY)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    stopped = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=12,
                                             stop=["Paris"], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert "Paris" not in stopped.choices[0].message.content


@pytest.mark.slow
def test_chat_accepts_tools_and_content_parts(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    got = client.chat.completions.create(model=SMOL, messages=messages, tools=tools, tool_choice="auto",
                                         parallel_tool_calls=False, user="u1", metadata={"k": "v"},
                                         n=1, logprobs=False, max_tokens=2, **GREEDY)
    assert got.usage.completion_tokens > 0


@pytest.mark.slow
def test_client_disconnect_cancels_the_generation(client, hippod):
    stream = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Count from 1 to 500."}],
        max_tokens=400, stream=True, **GREEDY)
    got = [c for c, _ in zip(stream, range(3))]
    assert got and _busy(hippod) == 1
    stream.close()
    deadline = time.monotonic() + 20
    while _busy(hippod) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _busy(hippod) == 0, "the generation kept its lease after the client left"


# -- completions ------------------------------------------------------------------------------


@pytest.mark.slow
def test_completions_non_stream_and_stream(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model=SMOL, prompt=prompt, max_tokens=8, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == 5  # raw prompt, no chat template around it
    assert 0 < whole.usage.completion_tokens <= 8

    chunks = list(client.completions.create(model=SMOL, prompt=[prompt], max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "text_completion" for c in chunks)
    *content, last, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in content) == choice.text
    assert last.choices[0].finish_reason == choice.finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == whole.usage.total_tokens


@pytest.mark.slow
def test_completions_default_max_tokens_is_16(client):
    got = client.completions.create(model=SMOL, prompt="Once upon a time", temperature=0)
    assert got.usage.completion_tokens <= 16
    assert got.choices[0].finish_reason == "length" or got.usage.completion_tokens < 16


# -- embeddings -------------------------------------------------------------------------------


def _norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


@pytest.mark.slow
def test_embeddings_float_and_base64(client, hippod):
    texts = ["The cat sat on the mat.", "Quarterly revenue rose sharply."]
    got = client.embeddings.create(model=SMOL, input=texts, encoding_format="float")
    assert got.object == "list" and got.model == SMOL
    assert [d.index for d in got.data] == [0, 1]
    a, b = (d.embedding for d in got.data)
    assert len(a) == len(b) > 16
    assert abs(_norm(a) - 1) < 1e-3 and abs(_norm(b) - 1) < 1e-3
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-3
    assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens

    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="smollm2", input=texts)
    for d, ref in zip(default.data, (a, b)):
        assert max(abs(x - y) for x, y in zip(d.embedding, ref)) < 1e-6

    status, raw = hippod.request("POST", "/v1/embeddings",
                                 {"model": SMOL, "input": texts[0], "encoding_format": "base64"})
    assert status == 200
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert struct.unpack(f"<{len(a)}f", packed) == pytest.approx(a, abs=1e-6)

    same = client.embeddings.create(model=SMOL, input=texts[0], dimensions=len(a),
                                    encoding_format="float")
    assert len(same.data) == 1 and len(same.data[0].embedding) == len(a)
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=SMOL, input=texts[0], dimensions=8)
    assert exc.value.param == "dimensions"


def test_token_id_embeddings_say_how_to_send_text(client):
    """Pre-tokenized input (tiktoken ids, as LangChain's OpenAIEmbeddings sends by default) is
    refused before any model loads, with the client setting that sends text instead."""
    for ids in ([[15339, 1917]], [101, 102, 103]):
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=SMOL, input=ids)
        assert exc.value.param == "input"
        assert "token ids" in exc.value.message and "check_embedding_ctx_length=False" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=SMOL, input=["fine", 7])
    assert exc.value.param == "input" and "input[1] must be a string, got int" in exc.value.message


# -- capacity errors --------------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_is_a_507_in_openai_shape(daemon_factory, smol_gguf):
    small = daemon_factory("small", env={"HIPPO_MEMORY_BUDGET": "10MB"})
    status, body = small.request("POST", "/api/create",
                                 {"model": "smollm2", "from": str(smol_gguf), "stream": False},
                                 timeout=300)
    assert status == 200, body
    oai = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0, timeout=60)
    for call in (lambda: oai.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=2),
                 lambda: oai.completions.create(model=SMOL, prompt="Hi", max_tokens=2, stream=True),
                 lambda: oai.embeddings.create(model=SMOL, input="Hi")):
        with pytest.raises(openai.InternalServerError) as exc:
            call()
        assert exc.value.status_code == 507
        assert exc.value.type == "insufficient_memory" and exc.value.code == "507"
    assert small.runner_pids() == []


# -- structured output and tools through the SDK (issue 4) ----------------------------------------

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
        "properties": {"city": {"type": "string", "maxLength": 16},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}}


@pytest.mark.slow
def test_json_schema_response_format_validates(client):
    import concurrent.futures

    import jsonschema

    prompts = [f"Give the largest city of {c} and its population as JSON."
               for c in ("France", "Japan", "Kenya")]  # (test_structured asks more, through both APIs)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}

    def ask(p):
        r = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": p}],
                                           response_format=fmt, max_tokens=48, **GREEDY)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, prompts))
    for a in answers:
        assert a.finish_reason == "stop", a
        jsonschema.validate(json.loads(a.message.content), CITY)


@pytest.mark.slow
def test_named_tool_choice_round_trip(client):
    import jsonschema

    params = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": params}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=SMOL, messages=messages, tools=tools, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)  # OpenAI sends arguments as a JSON string
    jsonschema.validate(args, params)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "clear"}'}]
    second = client.chat.completions.create(model=SMOL, messages=messages, tools=tools,
                                            max_tokens=16, **GREEDY)
    answer = second.choices[0]
    assert answer.message.role == "assistant" and not answer.message.tool_calls
    assert answer.message.content


@pytest.mark.slow
def test_streamed_tool_call_arrives_as_one_delta(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "required": ["q"], "properties": {"q": {"type": "string", "maxLength": 12}}}}}]
    chunks = list(client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Look up Paris."}], tools=tools,
        tool_choice="required", max_tokens=32, stream=True, **GREEDY))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "lookup"
    assert "q" in json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
