"""Grammar and tool-call machinery in-process, on a random-weight tiny llama and real tokenizers.

The tiny model babbles, so every valid JSON document it produces is the grammar's doing.
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from hippod.protocol import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

# Bounded, so a model stuck on "1111..." still has to close the document within its budget.
CITY = {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["city", "population"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}},
                   "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mlx_lm import load

    return load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_loop(tiny):
    from hippod.engine.batch_loop import BatchLoop

    model, tokenizer = tiny
    return BatchLoop(model, tokenizer, num_parallel=4, context_length=2048, info=lambda n: None)


def run_jobs(loop, requests: list[GenerateRequest]) -> list[dict]:
    """Drive the runner's BatchLoop in this thread until every request has finished."""
    from hippod.engine.batch_loop import Job

    results = [{"text": "", "done": None, "error": None} for _ in requests]

    def emitter(i):
        def emit(ev):
            if isinstance(ev, TokenEvent):
                results[i]["text"] += ev.text
            elif isinstance(ev, DoneEvent):
                results[i]["done"] = ev
            elif isinstance(ev, ErrorEvent):
                results[i]["error"] = ev
        return emit

    for i, req in enumerate(requests):
        loop.submit(Job(req, emitter(i)))
    while any(r["done"] is None and r["error"] is None for r in results):
        # One turn of BatchLoop.run_forever, without blocking when idle.
        loop._take_new(0)
        loop._drop_cancelled()
        loop._admit()
        if loop.solo is not None:
            loop._step_solo()
        elif loop.batched:
            loop._step_batch()
    return results


# -- the grammar --------------------------------------------------------------------------------


def _accepts(tokenizer, grammar: dict, text: str) -> bool:
    """Walk `text` token by token through the grammar; True if every token is allowed and the
    document is complete at the end."""
    import mlx.core as mx

    from hippod.engine.grammar import make_grammar_processor

    logits = mx.zeros((1, tokenizer.vocab_size))
    proc = make_grammar_processor(tokenizer, grammar)
    context = tokenizer.encode("prompt")
    out = proc(mx.array(context), logits)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if mx.isinf(out[0, token]).item():
            return False
        context.append(token)
        out = proc(mx.array(context), logits)
    return proc.done


def test_schema_holds_for_20_of_20_on_a_random_model(tiny_loop):
    reqs = [GenerateRequest(prompt=f"Describe city number {i}.", grammar={"json_schema": CITY},
                            options={"temperature": 1.0, "seed": i, "num_predict": 96})
            for i in range(20)]
    results = run_jobs(tiny_loop, reqs)
    for r in results:
        assert r["error"] is None
        assert r["done"].done_reason == "stop", r  # the grammar ended it, not the budget
        jsonschema.validate(json.loads(r["text"]), CITY)
    assert len({r["text"] for r in results}) > 10  # really 20 different answers


def test_json_object_mode_allows_any_object_and_nothing_else(tiny):
    """A random model writes endless keys under {"type": "object"}; walk known texts instead."""
    _, tokenizer = tiny

    def walk(text: str) -> bool:
        return _accepts(tokenizer, {"json_object": True}, text)

    assert walk('{"a": [1, {"b": null}], "c": "x"}')
    assert walk('{}')
    assert not walk('[1, 2]')
    assert not walk('"text"')
    assert not walk('{"a": 1,}')


def test_unconstrained_random_model_is_not_json(tiny_loop):
    """The control: without the grammar the same model does not write valid JSON."""
    reqs = [GenerateRequest(prompt=f"Describe city number {i}.",
                            options={"temperature": 1.0, "seed": i, "num_predict": 24})
            for i in range(4)]
    for r in run_jobs(tiny_loop, reqs):
        with pytest.raises(ValueError):
            jsonschema.validate(json.loads(r["text"]), CITY)


def test_grammar_and_free_requests_share_a_batch(tiny_loop):
    reqs = [GenerateRequest(prompt="a", grammar={"json_schema": CITY},
                            options={"temperature": 0, "num_predict": 96}),
            GenerateRequest(prompt="b", options={"temperature": 0, "num_predict": 10}),
            GenerateRequest(prompt="c", grammar={"json_schema": {"type": "array",
                                                                 "items": {"type": "boolean"},
                                                                 "maxItems": 3}},
                            options={"temperature": 0, "num_predict": 96})]
    a, b, c = run_jobs(tiny_loop, reqs)
    jsonschema.validate(json.loads(a["text"]), CITY)
    assert b["done"].done_reason == "length" and b["done"].completion_tokens == 10
    assert all(isinstance(x, bool) for x in json.loads(c["text"]))


def test_grammar_survives_decoding_alone_then_joining_a_batch(tiny_loop):
    """A lone request decodes on generate_step; a second arrival moves it into the batch, where
    its last token is shown to the grammar again. Both stretches must stay on the grammar."""
    from hippod.engine.batch_loop import Job

    texts, done = ["", ""], [None, None]

    def emitter(i):
        def emit(ev):
            if isinstance(ev, TokenEvent):
                texts[i] += ev.text
            elif isinstance(ev, DoneEvent):
                done[i] = ev
            else:
                raise AssertionError(ev)
        return emit

    def turn():
        tiny_loop._take_new(0)
        tiny_loop._admit()
        if tiny_loop.solo is not None:
            tiny_loop._step_solo()
        elif tiny_loop.batched:
            tiny_loop._step_batch()

    opts = {"temperature": 1.0, "seed": 3, "num_predict": 96}
    tiny_loop.submit(Job(GenerateRequest(prompt="alone", grammar={"json_schema": CITY}, options=opts),
                         emitter(0)))
    for _ in range(6):
        turn()
    assert tiny_loop.solo is not None and done[0] is None and texts[0]  # mid-document, alone
    tiny_loop.submit(Job(GenerateRequest(prompt="second", grammar={"json_schema": CITY},
                                         options=opts), emitter(1)))
    turn()
    assert tiny_loop.solo is None and len(tiny_loop.batched) == 2  # moved
    while None in done:
        turn()
    for text, d in zip(texts, done):
        assert d.done_reason == "stop", text
        jsonschema.validate(json.loads(text), CITY)


@pytest.mark.parametrize("schema,fragment", [
    ({"type": "strin"}, "strin"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "object", "properties": [1]}, "properties"),  # closing leaves it for the compiler
])
def test_a_schema_that_cannot_be_enforced_is_a_400(tiny_loop, schema, fragment):
    (r,) = run_jobs(tiny_loop, [GenerateRequest(prompt="x", grammar={"json_schema": schema})])
    assert r["error"] is not None and r["error"].status == 400
    assert fragment in r["error"].message


def test_compiled_grammars_are_cached_per_schema(tiny):
    from hippod.engine.grammar import GrammarCompiler

    _, tokenizer = tiny
    compiler = GrammarCompiler(tokenizer, cache_size=2)
    a = compiler.matcher({"json_schema": CITY})
    b = compiler.matcher({"json_schema": dict(reversed(list(CITY.items())))})  # same schema
    assert a is not b and len(compiler._cache) == 1
    compiler.matcher({"json_object": True})
    compiler.matcher({"json_schema": {"type": "integer"}})
    assert len(compiler._cache) == 2 and json.dumps({"json_schema": CITY}, sort_keys=True,
                                                    separators=(",", ":")) not in compiler._cache


def test_mask_is_padded_to_the_logits_width_and_ends_in_eos(tiny):
    import mlx.core as mx

    from hippod.engine.grammar import make_grammar_processor

    _, tokenizer = tiny
    proc = make_grammar_processor(tokenizer, {"json_schema": {"type": "boolean"}})
    vocab = proc.vocab_size
    logits = mx.zeros((1, vocab + 100))
    prompt = mx.array(tokenizer.encode("hi"))
    out = proc(prompt, logits)
    assert out.shape == (1, vocab + 100)
    assert bool(mx.all(mx.isinf(out[0, vocab:])))  # ids the tokenizer lacks are never allowed
    allowed = {i for i in range(vocab) if not mx.isinf(out[0, i]).item()}
    texts = {tokenizer.decode([i]) for i in allowed}
    assert texts and all("true".startswith(t) or "false".startswith(t) for t in texts)
    for token in tokenizer.encode("true", add_special_tokens=False):
        out = proc(mx.concatenate([prompt, mx.array([token])]), logits)
        prompt = mx.concatenate([prompt, mx.array([token])])
    assert proc.done
    still = [i for i in range(vocab + 100) if not mx.isinf(out[0, i]).item()]
    assert still == sorted(tokenizer.eos_token_ids)
    assert proc.allowed(vocab - 5).shape == (vocab - 5,)


# -- tool calls ---------------------------------------------------------------------------------


def test_named_tool_choice_forces_a_valid_call(tiny_loop):
    reqs = [GenerateRequest(messages=[{"role": "user", "content": f"Weather in town {i}?"}],
                            tools=[WEATHER_TOOL, TIME_TOOL],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                            options={"temperature": 1.0, "seed": i, "num_predict": 96})
            for i in range(4)]
    for r in run_jobs(tiny_loop, reqs):
        assert r["text"] == ""  # the call is not streamed as content
        (call,) = r["done"].tool_calls
        assert call["name"] == "get_weather"
        jsonschema.validate(call["arguments"], WEATHER_TOOL["function"]["parameters"])


def test_required_tool_choice_calls_one_of_the_tools(tiny_loop):
    reqs = [GenerateRequest(prompt=f"Do something {i}", tools=[WEATHER_TOOL, TIME_TOOL],
                            tool_choice="required",
                            options={"temperature": 1.0, "seed": i, "num_predict": 96})
            for i in range(4)]
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    for r in run_jobs(tiny_loop, reqs):
        (call,) = r["done"].tool_calls
        jsonschema.validate(call["arguments"], tools[call["name"]])


def test_unknown_tool_choice_is_a_400(tiny_loop):
    """The API names the bad choice (api/tooling.py); the runner, which trusts it, still fails
    cleanly on one that slipped through rather than generating unconstrained."""
    (r,) = run_jobs(tiny_loop, [GenerateRequest(
        prompt="x", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "nope"}})])
    assert r["error"].status == 400


def test_tool_choice_none_hides_the_tools(tiny):
    from hippod.engine.prompts import render_prompt
    from hippod.engine.tool_calls import prepare_request

    _, tokenizer = tiny
    req = GenerateRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL])
    with_tools = tokenizer.decode(render_prompt(tokenizer, prepare_request(tokenizer, req)))
    assert "get_weather" in with_tools and '"arguments"' in with_tools
    req.tool_choice = "none"
    assert "get_weather" not in tokenizer.decode(render_prompt(tokenizer, prepare_request(tokenizer, req)))


def test_history_with_calls_renders_on_a_template_without_tools(tiny):
    """SmolLM2's template knows no tools: calls become JSON text, results a user turn."""
    from hippod.engine.prompts import render_prompt
    from hippod.engine.tool_calls import prepare_request

    _, tokenizer = tiny
    req = GenerateRequest(tools=[WEATHER_TOOL], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "22 degrees, sunny"}])
    text = tokenizer.decode(render_prompt(tokenizer, prepare_request(tokenizer, req)))
    assert "Be brief.\n\nYou can call these tools:" in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<|im_start|>user\nResult of the tool get_weather: 22 degrees, sunny" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("text,expected", [
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('  <tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>',
     [("get_time", {"tz": "UTC"})]),
    ('```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "parameters": {}}]\n```',
     [("get_time", {}), ("get_weather", {})]),
    ('{"name": "launch_rockets", "arguments": {}}', None),  # not one of the tools
    ('{"city": "Oslo"}', None),
    ('The weather is fine.', None),
    ('{"name": "get_time", "arguments": {"tz"', None),  # cut short
])
def test_fallback_parser(text, expected):
    from hippod.engine.tool_calls import parse_json_calls

    calls = parse_json_calls(text, [WEATHER_TOOL, TIME_TOOL])
    assert (None if calls is None else [(c["name"], c["arguments"]) for c in calls]) == expected


@pytest.fixture(scope="module")
def qwen_style_tokenizer(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer under a template with <tool_call> tags and mlx_lm's json_tools."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    d = tmp_path_factory.mktemp("qwen-style")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for tool_call in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ tool_call.function.name }}\", "
        "\"arguments\": {{ tool_call.function.arguments | tojson }}}</tool_call>{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg["tool_parser_type"] = "json_tools"  # what a Qwen/Hermes-style checkpoint declares
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    return tok


def test_native_markup_is_parsed_by_the_family_parser(qwen_style_tokenizer):
    from hippod.engine.tool_calls import parse_tool_calls

    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"tz": "CET"}}\n</tool_call>')
    content, calls = parse_tool_calls(text, qwen_style_tokenizer, [WEATHER_TOOL, TIME_TOOL])
    assert content == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}},
                     {"name": "get_time", "arguments": {"tz": "CET"}}]
    content, calls = parse_tool_calls("<tool_call>{broken", qwen_style_tokenizer, [WEATHER_TOOL])
    assert calls is None and content == "<tool_call>{broken"


def test_template_with_tools_gets_them_itself(qwen_style_tokenizer):
    from hippod.engine.tool_calls import prepare_request

    req = GenerateRequest(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]}], tools=[TIME_TOOL])
    out = prepare_request(qwen_style_tokenizer, req)
    assert out.tools == [TIME_TOOL] and out.messages[0] == {"role": "user", "content": "hi"}
    assert out.messages[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}


def test_buffer_streams_text_but_holds_calls(qwen_style_tokenizer, tiny):
    from hippod.engine.tool_calls import ToolCallBuffer

    _, plain = tiny
    buf = ToolCallBuffer(plain, [WEATHER_TOOL])
    assert buf.feed("  ") == "" and buf.feed("It is") == "  It is" and buf.feed(" sunny.") == " sunny."
    assert buf.finish() == ("", None)

    buf = ToolCallBuffer(plain, [WEATHER_TOOL])
    parts = [buf.feed(p) for p in ['{"name": "get_weather", ', '"arguments": {"city": "Oslo", ',
                                   '"unit": "celsius"}}']]
    assert parts == ["", "", ""]
    assert buf.finish() == ("", [{"name": "get_weather",
                                  "arguments": {"city": "Oslo", "unit": "celsius"}}])

    buf = ToolCallBuffer(plain, [WEATHER_TOOL])
    assert buf.feed('{"answer": 42}') == ""
    assert buf.finish() == ('{"answer": 42}', None)  # JSON that is no call comes out as text

    buf = ToolCallBuffer(qwen_style_tokenizer, [TIME_TOOL])
    out = buf.feed("Checking <tool") + buf.feed('_call>{"name": "get_time", "arguments": {"tz": "UTC"}}')
    assert out == "Checking "
    out += buf.feed("</tool_call> done")
    assert out == "Checking "
    assert buf.finish() == (" done", [{"name": "get_time", "arguments": {"tz": "UTC"}}])


def test_call_schema_shapes():
    from hippod.engine.tool_calls import call_schema

    one = call_schema([WEATHER_TOOL, TIME_TOOL], "get_time")
    assert one["properties"]["name"] == {"const": "get_time"}
    jsonschema.validate({"name": "get_time", "arguments": {"tz": "UTC"}}, one)
    anyof = call_schema([WEATHER_TOOL, TIME_TOOL])
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "x", "unit": "celsius"}}, anyof)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"tz": "UTC"}}, anyof)


# -- closing objects as Ollama does -------------------------------------------------------------


def _closed_validator(schema: dict):
    from hippod.engine.grammar import close_objects

    return jsonschema.Draft202012Validator(close_objects(schema))


def _nested_model_schema() -> dict:
    from typing import Optional, Union

    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        country: Optional[str] = None

    class Trip(BaseModel):
        name: str
        stops: list[Place]
        home: Optional[Place] = None
        counts: dict[str, int]
        anything: Union[Place, dict]

    return Trip.model_json_schema()


def test_closing_reaches_every_object_of_a_pydantic_schema():
    """No model sets additionalProperties: closed, extra keys fail at the top, in a list item, in a
    $defs model behind anyOf; declared maps (dict[str, int], additionalProperties: true) stay open."""
    schema = _nested_model_schema()
    v = _closed_validator(schema)
    good = {"name": "t", "stops": [{"city": "Oslo"}], "home": {"city": "Rome", "country": "IT"},
            "counts": {"a": 1, "b": 2}, "anything": {"free": [1]}}
    assert v.is_valid(good) and jsonschema.Draft202012Validator(schema).is_valid(good)
    for bad in ({**good, "extra": 1},
                {**good, "stops": [{"city": "Oslo", "population": 1}]},
                {**good, "home": {"city": "Rome", "capital": True}},
                {**good, "counts": {"a": "x"}}):
        assert not v.is_valid(bad), bad
        if bad["counts"] == good["counts"]:
            assert jsonschema.Draft202012Validator(schema).is_valid(bad)  # open as written


@pytest.mark.parametrize("schema,ok,bad", [
    ({"type": "object"}, {"any": 1}, []),  # json mode: any object
    ({"type": "object", "properties": {}}, {}, {"a": 1}),  # an empty model: only {}
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, {"b": 1}, []),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
     {"a": "s", "b": 1}, {"b": "s"}),
    ({"type": "object", "additionalProperties": {"properties": {"x": {}}}},  # a map of closed objects
     {"k": {"x": 1}}, {"k": {"y": 1}}),
    ({"type": "array", "items": {"properties": {"x": {}}}}, [{"x": 1}], [{"y": 1}]),
    ({"type": "array", "prefixItems": [{"properties": {"x": {}}}]}, [{"x": 1}, 5], [{"y": 1}]),
    ({"properties": {"p": {"$ref": "#/definitions/D"}}, "definitions": {"D": {"properties": {"x": {}}}}},
     {"p": {"x": 1}}, {"p": {"z": 1}}),
    ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}}, {"x_a": 1}, {"y": 1}),
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, {"a": 1, "b": 2},
     {"a": 1, "b": 2, "c": 3}),  # a key only `required` names counts as declared
])
def test_closing_rule_cases(schema, ok, bad):
    v = _closed_validator(schema)
    assert v.is_valid(ok)
    if bad != []:
        assert not v.is_valid(bad)


def test_closing_merges_keys_across_combinators():
    """Closing each member alone would make allOf unsatisfiable; keys are merged as llama.cpp does."""
    all_of = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"$ref": "#/$defs/B"}],
              "$defs": {"B": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    v = _closed_validator(all_of)
    assert v.is_valid({"a": 1, "b": 2})
    assert not v.is_valid({"a": 1, "b": 2, "c": 3}) and not v.is_valid({"a": "x", "b": 2})
    assert _closed_validator(all_of["$defs"]["B"]).is_valid({"b": 1})  # the definition elsewhere

    tagged = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}},
              "anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    v = _closed_validator(tagged)
    assert v.is_valid({"kind": "a", "a": 1}) and v.is_valid({"kind": "b", "b": 2})
    assert not v.is_valid({"kind": "a", "a": 1, "c": 3})
    assert not v.is_valid({"kind": "a", "a": 1, "b": "x"})

    union_with_map = {"anyOf": [{"properties": {"a": {}}}, {"type": "object", "additionalProperties": True}]}
    assert _closed_validator(union_with_map).is_valid({"z": 1})  # a member allows any key


def test_closing_copies_and_is_idempotent():
    from hippod.engine.grammar import close_objects

    schema = _nested_model_schema()
    before = json.dumps(schema, sort_keys=True)
    once = close_objects(schema)
    assert json.dumps(schema, sort_keys=True) == before  # the caller's schema is untouched
    assert close_objects(once) == once


def test_the_grammar_enforces_closed_objects(tiny):
    """The runner's grammar (not only the schema) refuses an invented key, at any depth."""
    _, tokenizer = tiny
    g = {"json_schema": _nested_model_schema()}
    good = ('{"name": "t", "stops": [{"city": "Oslo"}], "home": null, "counts": {"a": 1}, '
            '"anything": {"x": 1}}')
    assert _accepts(tokenizer, g, good)
    assert not _accepts(tokenizer, g, good[:-1] + ', "extra": 1}')
    assert not _accepts(tokenizer, g, good.replace('{"city": "Oslo"}', '{"city": "Oslo", "pop": 1}'))


def test_whitespace_between_tokens_is_bounded(tiny):
    """At most one space, or one newline and 16 blanks, between tokens; nothing around the value."""
    _, tokenizer = tiny
    g = {"json_schema": CITY}
    assert _accepts(tokenizer, g, '{\n  "city": "Oslo",\n  "population": 5\n}')
    assert _accepts(tokenizer, g, '{"city":"Oslo","population":5}')
    for loose in ('{  "city": "Oslo", "population": 5}', '{\n\n"city": "Oslo", "population": 5}',
                  '{\n' + ' ' * 17 + '"city": "Oslo", "population": 5}',
                  ' {"city": "Oslo", "population": 5}'):
        assert not _accepts(tokenizer, g, loose), loose
    compact = {**g, "compact": True}  # a required tool call: one line, ", " and ": "
    assert _accepts(tokenizer, compact, '{"city": "Oslo", "population": 5}')
    for other in ('{"city":"Oslo","population":5}', '{\n  "city": "Oslo", "population": 5}'):
        assert not _accepts(tokenizer, compact, other)


def test_tool_parameters_with_definitions_compile_closed(tiny):
    """A pydantic model as a tool's parameters: its #/$defs refs still resolve inside the call
    schema, and its objects are closed like any schema's."""
    from hippod.engine.tool_calls import call_schema

    _, tokenizer = tiny
    params = _nested_model_schema()
    tools = [{"type": "function", "function": {"name": "plan", "parameters": params}}, TIME_TOOL]
    args = '{"name": "t", "stops": [{"city": "Oslo"}], "counts": {}, "anything": {"city": "x"}}'
    for name in ("plan", None):
        g = {"json_schema": call_schema(tools, name)}
        assert _accepts(tokenizer, g, '{"name": "plan", "arguments": ' + args + '}')
        assert not _accepts(tokenizer, g, '{"name": "plan", "arguments": ' +
                            args.replace('"Oslo"}', '"Oslo", "x": 1}') + '}')


def test_schema_checks_in_the_daemon_use_the_runner_rule_without_mlx():
    """The API's 400 check compiles through the same entry point and never imports mlx."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from hippod.api.tooling import check_schema\n"
            "from hippod.api.errors import BadRequest\n"
            "check_schema({'type': 'object', 'properties': {'a': {'$ref': '#/$defs/A'}},"
            " '$defs': {'A': {'properties': {'x': {}}}}}, 'format')\n"
            "try:\n"
            "    check_schema({'type': 'strin'}, 'format')\n"
            "except BadRequest as e:\n"
            "    print('400:', e)\n"
            "assert 'mlx' not in sys.modules, 'the daemon imported mlx'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("400: format:") and "strin" in out.stdout


# -- a required call is always a call -----------------------------------------------------------


def test_required_call_cut_short_is_length_with_the_partial_call(tiny_loop):
    reqs = [GenerateRequest(prompt=f"Do something {i}", tools=[WEATHER_TOOL, TIME_TOOL],
                            tool_choice="required",
                            options={"temperature": 1.0, "seed": i, "num_predict": n})
            for i, n in enumerate((3, 9, 14))]
    for r in run_jobs(tiny_loop, reqs):
        assert r["error"] is None and r["text"] == ""  # never passed off as content
        d = r["done"]
        assert d.done_reason == "length" and d.tool_calls is None
        (partial,) = d.partial_tool_calls
        assert any(n.startswith(partial["name"]) for n in ("get_weather", "get_time"))
        assert isinstance(partial["arguments"], str)
        if partial["arguments"]:
            assert partial["arguments"].startswith("{") and partial["name"] in ("get_weather", "get_time")


def test_stop_sequences_do_not_cut_a_required_call(tiny_loop):
    (r,) = run_jobs(tiny_loop, [GenerateRequest(
        prompt="weather", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        options={"temperature": 1.0, "seed": 5, "num_predict": 96, "stop": ['"', "name"]})])
    assert r["done"].done_reason == "stop", r
    (call,) = r["done"].tool_calls
    jsonschema.validate(call["arguments"], WEATHER_TOOL["function"]["parameters"])


@pytest.mark.parametrize("text,fragment", [
    ('{"name": "get_time", "arguments": {"tz"', "not valid JSON"),
    ('{"name": "launch", "arguments": {}}', "does not call one of the tools ['get_time']"),
])
def test_an_unparsed_required_call_is_named_in_the_error(text, fragment):
    from hippod.engine.tool_calls import ToolCallBuffer, forced_failure

    buf = ToolCallBuffer(None, [TIME_TOOL], forced=True)
    assert buf.feed(text) == ""
    assert buf.finish() == ("", None) and buf.unparsed == text
    assert fragment in forced_failure(text, [TIME_TOOL])


@pytest.mark.parametrize("text,expected", [
    ("", {"name": "", "arguments": ""}),
    ('{"name": "get_w', {"name": "get_w", "arguments": ""}),
    ('{"name": "get_time", "argu', {"name": "get_time", "arguments": ""}),
    ('{\n  "name": "get_time",\n  "arguments": {"tz": "U', {"name": "get_time", "arguments": '{"tz": "U'}),
])
def test_partial_call_reads_the_name_and_raw_arguments(text, expected):
    from hippod.engine.tool_calls import partial_call

    assert partial_call(text) == expected


# -- greedy output does not depend on the prompt cache ------------------------------------------


def test_penalties_see_the_same_history_after_a_prompt_cache_hit(tiny_loop):
    """A solo request resumed from the prompt cache decodes only the prompt's tail; its repetition
    penalty must still see the whole prompt, as on a cold run."""
    # The random model's favourite word is all over the prompt but not its last token: a
    # penalty that sees only the uncached tail lets it through.
    prompt = "start cyt nost " + "sensor " * 16 + "hello"
    opts = {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.5, "repeat_last_n": 64}
    tiny_loop.prompt_cache.clear()
    (cold,) = run_jobs(tiny_loop, [GenerateRequest(prompt=prompt, raw=True, options=opts)])
    (warm,) = run_jobs(tiny_loop, [GenerateRequest(prompt=prompt, raw=True, options=opts)])
    assert cold["done"].cached_tokens == 0 and warm["done"].cached_tokens > 16
    assert warm["text"] == cold["text"]
    assert "sensor" not in cold["text"][:8]
