"""Fields a client leaves unset take the model's defaults on both APIs, not OpenAI's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ollama
import openai
import pytest

from hippod.api import defaults
from hippod.protocol import GenerateRequest
from hippod.store.records import ModelRecord
from tests.conftest import SMOL

GREETING = re.compile(r"\b(hi|hello|hey|greetings|welcome|how are you|how can i (help|assist))\b", re.I)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def oai(hippod) -> openai.OpenAI:
    return openai.OpenAI(base_url=hippod.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def warm_hi(oai):
    """A seed fixes the sampling, not the numerics: a prompt computed fresh and one continued
    from the prompt cache round differently. Once "hi" is cached every seeded ask agrees."""
    oai.chat.completions.create(model=SMOL, messages=HI, max_tokens=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_openai_sdk_defaults_greet_back(oai, warm_hi, seed):
    """The SDK sends no temperature: the model's (Ollama's) defaults apply, and SmolLM2 greets."""
    got = oai.chat.completions.create(model=SMOL, messages=HI, max_tokens=16, seed=seed)
    text = got.choices[0].message.content
    assert GREETING.search(text), text


@pytest.mark.slow
def test_ollama_defaults_greet_back(hippod, warm_hi):
    r = ollama.Client(host=hippod.url).chat(model="smollm2", messages=HI,
                                            options={"seed": 5, "num_predict": 16})
    assert GREETING.search(r.message.content), r.message.content


@pytest.fixture(scope="module")
def greedy_by_config(hippod, tiny_model_dir, tmp_path_factory) -> str:
    """A tiny model whose generation_config.json says temperature 0 (greedy)."""
    src = tmp_path_factory.mktemp("gencfg") / "tiny-greedy"
    shutil.copytree(tiny_model_dir, src)
    cfg = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.0}))
    status, body = hippod.request("POST", "/api/create", {"model": "tiny-greedy", "from": str(src),
                                                          "stream": False}, timeout=120)
    assert status == 200, body
    return "tiny-greedy"


@pytest.mark.slow
def test_generation_config_is_the_default_and_the_client_overrides_it(hippod, greedy_by_config):
    def ask(options=None):
        body = {"model": greedy_by_config, "prompt": "Tell me a story.", "stream": False,
                "options": {"num_predict": 12, **(options or {})}}
        status, got = hippod.request("POST", "/api/generate", body)
        assert status == 200, got
        return got["response"]

    # unseeded: only the config's temperature 0 makes two answers agree
    assert ask() == ask()
    sampled = {ask({"temperature": 1.5, "top_k": 0, "top_p": 1.0}) for _ in range(3)}
    assert len(sampled) > 1  # a random tiny model at temperature 1.5: 12 tokens never repeat


def _record(**details) -> ModelRecord:
    return ModelRecord(name="m:latest", source="dir:/x", digest=f"d{hash(json.dumps(details))}",
                       files=[], format="mlx", details=details)


def test_precedence_client_then_modelfile_then_generation_config_then_ollama(tmp_path: Path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.05, "top_k": "bogus"}))
    rec = _record(parameters={"temperature": 0.3, "stop": ["<end>"], "num_ctx": 1024})
    got = defaults.apply(GenerateRequest(prompt="x", options={"top_p": 0.5}), rec, tmp_path).options
    assert got["top_p"] == 0.5  # the client
    assert got["temperature"] == 0.3 and got["stop"] == ["<end>"] and got["num_ctx"] == 1024
    assert got["repeat_penalty"] == 1.05  # generation_config.json
    assert got["top_k"] == 40 and got["repeat_last_n"] == 64  # Ollama's (the bogus top_k is skipped)
    assert defaults.apply(GenerateRequest(prompt="x"), _record(), tmp_path / "none").options[
        "repeat_penalty"] == 1.0  # off unless the model or the client asks for it
    bare = defaults.apply(GenerateRequest(prompt="x"), _record(), tmp_path / "none").options
    assert bare["temperature"] == 0.8 and bare["top_p"] == 0.9


def test_modelfile_system_and_messages():
    rec = _record(system="You are terse.", messages=[{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}])
    chat = defaults.apply(GenerateRequest(messages=[{"role": "user", "content": "q"}]), rec, Path("/x"))
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert chat.messages[0]["content"] == "You are terse." and chat.messages[-1]["content"] == "q"
    own = defaults.apply(GenerateRequest(messages=[{"role": "system", "content": "Mine."},
                                                   {"role": "user", "content": "q"}]), rec, Path("/x"))
    assert [m["content"] for m in own.messages] == ["Mine.", "a", "b", "q"]
    gen = defaults.apply(GenerateRequest(prompt="q"), _record(system="S"), Path("/x"))
    assert gen.system == "S" and gen.prompt == "q"
    asked = defaults.apply(GenerateRequest(prompt="q", system="T"), _record(system="S"), Path("/x"))
    assert asked.system == "T"
    with_history = defaults.apply(GenerateRequest(prompt="q"), rec, Path("/x"))
    assert with_history.messages[-1] == {"role": "user", "content": "q"} and with_history.prompt is None
    raw = defaults.apply(GenerateRequest(prompt="q", raw=True), rec, Path("/x"))
    assert raw.prompt == "q" and raw.messages is None and raw.system is None


@pytest.mark.slow
def test_modelfile_parameters_system_and_messages_apply_on_both_apis(hippod, oai):
    client = ollama.Client(host=hippod.url)
    client.create(model="capped", from_="smollm2", parameters={"temperature": 0, "num_predict": 3})
    count = [{"role": "user", "content": "Count from one to twenty, one number per line."}]
    first = client.chat(model="capped", messages=count)
    assert first.eval_count == 3 and first.done_reason == "length"  # the Modelfile's num_predict
    assert client.chat(model="capped", messages=count).message.content == first.message.content  # temp 0
    assert client.chat(model="capped", messages=count, options={"num_predict": 5}).eval_count == 5
    sdk = oai.chat.completions.create(model="capped", messages=count)  # no sampling fields sent
    assert sdk.usage.completion_tokens == 3 and sdk.choices[0].message.content == first.message.content

    client.create(model="terse", from_="smollm2", system="You answer with one word.",
                  messages=[{"role": "user", "content": "Capital of Italy?"},
                            {"role": "assistant", "content": "Rome"}])
    q = [{"role": "user", "content": "What is the capital of France?"}]
    one = {"num_predict": 1}
    base = client.chat(model="smollm2", messages=q, options=one).prompt_eval_count
    terse = client.chat(model="terse", messages=q, options=one).prompt_eval_count
    own = client.chat(model="terse", messages=[{"role": "system", "content": "Hi."}, *q],
                      options=one).prompt_eval_count
    assert terse > base  # the Modelfile's system and messages come first
    assert own < terse  # the request's own system message replaces the Modelfile's
