"""logprobs / top_logprobs on both APIs, through the official clients, alone, batched and constrained."""

from __future__ import annotations

import concurrent.futures
import json
import math

import ollama
import openai
import pytest

from tests.conftest import SMOL

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def oai(hippod) -> openai.OpenAI:
    return openai.OpenAI(base_url=hippod.url + "/v1", api_key="x", max_retries=0, timeout=300)


def _check_entries(entries, text: str, top: int) -> None:
    assert entries and "".join(e.token for e in entries).lstrip() == text
    for e in entries:
        assert e.logprob <= 0
        if getattr(e, "bytes", None) is not None:  # the ollama client's model drops bytes
            assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert 0 < len(e.top_logprobs) <= top
        assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs),
                                                             reverse=True)
        assert sum(math.exp(a.logprob) for a in e.top_logprobs) <= 1.0001
        # greedy: the chosen token is the most likely one of the distribution reported
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_openai_chat_logprobs_stream_and_not(oai):
    args = dict(model=SMOL, messages=FRANCE, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    whole = oai.chat.completions.create(**args)
    choice = whole.choices[0]
    _check_entries(choice.logprobs.content, choice.message.content, 3)
    chunks = list(oai.chat.completions.create(**args, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    # same tokens; the numbers agree to rounding (the second ask reuses the cached prompt)
    assert [e.token for e in streamed] == [e.token for e in choice.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in choice.logprobs.content],
                                                          abs=0.02)
    plain = oai.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_openai_completions_legacy_logprobs(oai):
    got = oai.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=6,
                                 temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    # the tokens are the model's own (" Paris"); mlx_lm's detokenizer trims the text's first space
    assert "".join(lp.tokens).lstrip() == got.choices[0].text.lstrip()
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and all(a < b for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and tok in top


def test_ollama_chat_and_generate_logprobs(hippod):
    client = ollama.Client(host=hippod.url)
    opts = {"temperature": 0, "num_predict": 8}
    r = client.chat(model="smollm2", messages=FRANCE, options=opts, logprobs=True, top_logprobs=2)
    _check_entries(r.logprobs, r.message.content, 2)
    parts = list(client.generate(model="smollm2", prompt="The capital of France is", options=opts,
                                 logprobs=True, top_logprobs=1, stream=True))
    entries = [e for p in parts for e in (p.logprobs or [])]
    _check_entries(entries, "".join(p.response for p in parts), 1)
    plain = client.chat(model="smollm2", messages=FRANCE, options={"temperature": 0, "num_predict": 2})
    assert not plain.logprobs


def test_logprobs_are_the_same_batched(oai):
    """Four requests at once share the BatchGenerator; each gets the logprobs it gets alone."""
    def ask(q):
        r = oai.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": q}],
                                        max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
        return [(e.token, e.logprob) for e in r.choices[0].logprobs.content]

    questions = ["What is the capital of France?", "Name a color.", "Say hello.", "Count to three."]
    alone = [ask(q) for q in questions[:1]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, questions))
    assert [t for t, _ in together[0]] == [t for t, _ in alone[0]]
    for (_, a), (_, b) in zip(together[0], alone[0]):
        assert a == pytest.approx(b, abs=0.05)  # batched kernels round differently
    assert all(together)


def test_logprobs_under_structured_output_are_the_constrained_distribution(oai):
    schema = {"type": "object", "required": ["city"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 12}}}
    r = oai.chat.completions.create(
        model=SMOL, messages=FRANCE, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    content = r.choices[0].message.content
    json.loads(content)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content
    # the grammar allows only the opening of an object first: no alternative may be anything else
    for alt in entries[0].top_logprobs:
        assert alt.token.lstrip(" \n\t").startswith("{") or not alt.token.strip(), alt
