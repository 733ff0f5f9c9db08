"""/v1/responses through the official `openai` SDK's client.responses, against the real daemon."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import SMOL

pytestmark = pytest.mark.slow
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 16}}}
LOOKUP = {"type": "function", "name": "lookup", "description": "Look up a place",
          "parameters": {"type": "object", "required": ["q"], "additionalProperties": False,
                         "properties": {"q": {"type": "string", "maxLength": 12}}}}


@pytest.fixture(scope="module")
def oai(hippod) -> openai.OpenAI:
    return openai.OpenAI(base_url=hippod.url + "/v1", api_key="x", max_retries=0, timeout=300)


def test_non_stream_and_stream_agree(oai):
    args = dict(model=SMOL, input="What is the capital of France?", max_output_tokens=10, temperature=0)
    r = oai.responses.create(**args)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == SMOL
    assert "Paris" in r.output_text
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens > 5
    assert 0 < r.usage.output_tokens <= 10
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    told = oai.responses.create(**{**args, "max_output_tokens": 1}, instructions="Reply in one word.")
    assert told.instructions == "Reply in one word."
    assert told.usage.input_tokens != r.usage.input_tokens  # the system message is the instructions
    events = list(oai.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
              "response.content_part.done", "response.output_item.done"):
        assert kinds.count(k) == 1, kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text


def test_max_output_tokens_is_incomplete(oai):
    r = oai.responses.create(model=SMOL, input="Count from one to fifty.", max_output_tokens=3,
                             temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_json_schema_text_format(oai):
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    r = oai.responses.create(model=SMOL, input="Name the capital of France as JSON.", text=fmt,
                             max_output_tokens=32, temperature=0)
    jsonschema.validate(json.loads(r.output_text), CITY)
    events = list(oai.responses.create(model=SMOL, input="Name the capital of Japan as JSON.",
                                       text=fmt, max_output_tokens=32, temperature=0, stream=True))
    jsonschema.validate(json.loads(events[-1].response.output_text), CITY)


def test_function_call_round_trip(oai):
    ask = [{"role": "user", "content": "Look up Paris."}]
    r = oai.responses.create(model=SMOL, input=ask, tools=[LOOKUP], tool_choice="required",
                             max_output_tokens=32, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "lookup" and call.call_id
    jsonschema.validate(json.loads(call.arguments), LOOKUP["parameters"])
    events = list(oai.responses.create(model=SMOL, input=ask, tools=[LOOKUP],
                                       tool_choice={"type": "function", "name": "lookup"},
                                       max_output_tokens=32, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["q"]
    # the call and its output go back in as input items: the model answers in text
    follow = oai.responses.create(model=SMOL, tools=[LOOKUP], max_output_tokens=12, temperature=0,
                                  input=ask + [{"type": "function_call", "call_id": call.call_id,
                                                "name": call.name, "arguments": call.arguments},
                                               {"type": "function_call_output", "call_id": call.call_id,
                                                "output": '{"country": "France"}'}])
    assert follow.output_text and not [o for o in follow.output if o.type == "function_call"]


def test_logprobs_in_output_text(oai):
    r = oai.responses.create(model=SMOL, input="Say hi.", max_output_tokens=4, temperature=0,
                             top_logprobs=2, include=["message.output_text.logprobs"])
    part = r.output[0].content[0]
    assert "".join(lp.token for lp in part.logprobs).lstrip() == part.text
    assert all(len(lp.top_logprobs) <= 2 for lp in part.logprobs)


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     "text.format.schema"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"temperature": 5}, "temperature"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
])
def test_refused_fields_name_the_param(oai, extra, param):
    args = {"model": SMOL, "input": "hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as exc:
        oai.responses.create(**args)
    assert exc.value.param == param
