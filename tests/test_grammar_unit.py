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
        loop._take_new(block=False)
        loop._drop_cancelled()
        loop._admit()
        if loop.solo is not None:
            loop._step_solo()
        elif loop.batched:
            loop._step_batch()
    return results


# -- the grammar --------------------------------------------------------------------------------


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
    import mlx.core as mx

    from hippod.engine.grammar import make_grammar_processor

    _, tokenizer = tiny
    logits = mx.zeros((1, tokenizer.vocab_size))

    def walk(text: str) -> bool:
        proc = make_grammar_processor(tokenizer, {"json_object": True})
        context = tokenizer.encode("prompt")
        out = proc(mx.array(context), logits)
        for token in tokenizer.encode(text, add_special_tokens=False):
            if mx.isinf(out[0, token]).item():
                return False
            context.append(token)
            out = proc(mx.array(context), logits)
        return proc.done

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
        tiny_loop._take_new(block=False)
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
