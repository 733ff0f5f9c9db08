"""The official `ollama` Python client against a real hippod serving the real SmolLM2."""

from __future__ import annotations

import json
import time
import urllib.request

import ollama
import pytest

from tests.conftest import SMOL

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(hippod):
    return ollama.Client(host=hippod.url)


def test_version_and_root(hippod):
    status, body = hippod.request("GET", "/api/version")
    assert status == 200 and body["version"]
    with urllib.request.urlopen(hippod.url + "/") as r:
        assert r.read() == b"Ollama is running"
    req = urllib.request.Request(hippod.url + "/", method="HEAD")
    with urllib.request.urlopen(req) as r:
        assert r.status == 200


def test_list_and_show(client):
    models = {m.model: m for m in client.list().models}
    assert SMOL in models
    smol = models[SMOL]
    assert smol.size > 90_000_000
    assert smol.details.family == "llama"
    assert smol.details.parameter_size == "135M"
    assert smol.details.quantization_level == "Q4_1"
    shown = client.show("smollm2")
    assert "<|im_start|>" in shown.template
    assert shown.details.format == "gguf"
    assert shown.modelinfo["general.parameter_count"] > 100_000_000


def test_generate_answers_paris(client):
    r = client.generate(model="smollm2", prompt=QUESTION, options=GREEDY)
    assert "Paris" in r.response
    assert r.done and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count > 10 and r.eval_count > 0
    assert r.total_duration >= r.eval_duration > 0
    assert r.prompt_eval_duration > 0


def test_generate_stream_matches_non_stream(client):
    full = client.generate(model="smollm2", prompt=QUESTION, options=GREEDY).response
    parts = list(client.generate(model="smollm2", prompt=QUESTION, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == full
    assert parts[-1].eval_count == len([p for p in parts[:-1]]) or parts[-1].eval_count > 0


def test_chat_stream_and_not(client):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat(model="smollm2", messages=messages, options=GREEDY)
    assert r.message.role == "assistant" and "Paris" in r.message.content
    chunks = list(client.chat(model="smollm2", messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == r.message.content
    assert chunks[-1].done_reason in ("stop", "length")


def test_num_predict_and_stop(client):
    r = client.generate(model="smollm2", prompt=QUESTION, options={"temperature": 0, "num_predict": 3})
    assert r.eval_count == 3 and r.done_reason == "length"
    r = client.generate(model="smollm2", prompt=QUESTION, options={**GREEDY, "stop": ["Paris"]})
    assert "Paris" not in r.response and r.done_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    opts = {"temperature": 0.9, "seed": 42, "num_predict": 6}
    a = client.generate(model="smollm2", prompt="Tell me a word.", options=opts).response
    b = client.generate(model="smollm2", prompt="Tell me a word.", options=opts).response
    assert a == b


def test_sampling_options_past_the_model_s_range_answer_and_keep_the_runner(client, hippod):
    """Options the API takes but a model cannot use as given: top_k past the vocabulary keeps
    every token, a negative seed is a random one, a seed past 64 bits still fixes the draw.
    Each answers 200, and the runner that served them is the one still loaded."""
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1})
    _, ps = hippod.request("GET", "/api/ps")
    pid = next(m["hippo"]["pid"] for m in ps["models"] if m["name"] == SMOL)
    for opts in ({"top_k": 100_000_000}, {"seed": -1}, {"seed": 2**70}, {"seed": 2**70, "top_k": 2**40}):
        r = client.generate(model="smollm2", prompt="Tell me a word.",
                            options={"temperature": 0.9, "num_predict": 4, **opts})
        assert r.done and r.eval_count >= 1, opts
    big = {"temperature": 0.9, "seed": 2**70 + 3, "num_predict": 6}
    assert client.generate(model="smollm2", prompt="Tell me a word.", options=big).response == \
        client.generate(model="smollm2", prompt="Tell me a word.", options=big).response
    _, ps = hippod.request("GET", "/api/ps")
    assert next(m["hippo"]["pid"] for m in ps["models"] if m["name"] == SMOL) == pid


def hippod_request(client):
    with urllib.request.urlopen(str(client._client.base_url.join("/api/ps"))) as r:
        return r.status, json.loads(r.read())


def test_ps_shows_loaded_model(client):
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1}, keep_alive="10m")
    loaded = {m.model: m for m in client.ps().models}
    assert SMOL in loaded
    m = loaded[SMOL]
    assert m.size > 0
    # size_vram is what sits in accelerator memory: all of it on a GPU, none on MLX's CPU build.
    status, raw = hippod_request(client)
    device = raw["models"][0]["hippo"]["device"]
    assert m.size_vram == (m.size if device == "gpu" else 0)
    assert m.expires_at is not None
    ctx = json.loads(urllib.request.urlopen(client._client.base_url.join("/api/ps").__str__()).read())
    assert ctx["models"][0]["context_length"] == 2048


def test_copy_and_delete(client, hippod):
    client.copy("smollm2", "smol-copy:v1")
    assert "smol-copy:v1" in {m.model for m in client.list().models}
    client.delete("smol-copy:v1")
    assert "smol-copy:v1" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("smol-copy:v1")
    assert e.value.status_code == 404
    # the original still serves
    assert SMOL in {m.model for m in client.list().models}


def test_embed(client):
    r = client.embed(model="smollm2", input=["Paris is in France.", "The cat sleeps."])
    a, b = r.embeddings
    assert len(a) == len(b) == 576
    assert abs(sum(x * x for x in a) - 1) < 1e-3
    assert a != b
    legacy = client.embeddings(model="smollm2", prompt="Paris is in France.")
    assert max(abs(x - y) for x, y in zip(legacy.embedding, a)) < 1e-4


def test_unknown_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="no-such-model", prompt="hi")
    assert e.value.status_code == 404
    assert "model 'no-such-model' not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "empty"),
    (json.dumps({"prompt": "hi"}).encode(), "model is required"),
    (json.dumps({"model": 42, "prompt": "hi"}).encode(), "model must be a string"),
    (json.dumps({"model": "smollm2", "prompt": 5}).encode(), "prompt must be a string"),
    (json.dumps({"model": "smollm2", "prompt": "hi", "options": {"temperature": "hot"}}).encode(),
     "options.temperature must be a number"),
    (json.dumps({"model": "smollm2", "prompt": "hi", "options": {"bogus": 1}}).encode(), "unknown option"),
    (json.dumps({"model": "smollm2", "prompt": "hi", "options": {"num_ctx": -5}}).encode(), "num_ctx"),
    (json.dumps({"model": "smollm2", "prompt": "hi", "keep_alive": "soon"}).encode(), "keep_alive"),
    (json.dumps({"model": "../../etc/passwd", "prompt": "hi"}).encode(), "invalid model name"),
    (json.dumps({"model": "a/../b", "prompt": "hi"}).encode(), "invalid model name"),
    (json.dumps({"model": "bad\u0000name", "prompt": "hi"}).encode(), "invalid model name"),
    (json.dumps({"model": "smollm2", "prompt": "hi", "images": ["aGk="]}).encode(), "images"),
])
def test_bad_input_gets_400(hippod, body, fragment):
    status, resp = hippod.request("POST", "/api/generate", body)
    assert status == 400, resp
    assert fragment in resp["error"], resp
    assert hippod.ping()


def test_bad_chat_messages(hippod):
    status, resp = hippod.request("POST", "/api/chat", {"model": "smollm2", "messages": "hi"})
    assert status == 400 and "messages must be a list" in resp["error"]
    status, resp = hippod.request("POST", "/api/chat",
                                  {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "role" in resp["error"]


def test_traversal_in_copy_and_create(hippod):
    status, resp = hippod.request("POST", "/api/copy", {"source": "smollm2", "destination": "../evil"})
    assert status == 400 and "invalid model name" in resp["error"]
    status, resp = hippod.request("POST", "/api/create", {"model": "x", "from": "relative/path.gguf",
                                                          "stream": False})
    assert status in (400, 404), resp


def test_create_from_bad_file_is_clear(hippod, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"definitely not a gguf file")
    status, resp = hippod.request("POST", "/api/create",
                                  {"model": "bogus", "from": str(bogus), "stream": False})
    assert status == 400 and "bogus.gguf" in resp["error"], resp
    status, _ = hippod.request("POST", "/api/show", {"model": "bogus"})
    assert status == 404


def test_unknown_route_and_method(hippod):
    status, resp = hippod.request("GET", "/api/nothing")
    assert status == 404 and "error" in resp
    status, resp = hippod.request("GET", "/api/generate")
    assert status == 405 and "error" in resp


def test_client_disconnect_frees_the_slot(hippod, client):
    """A stream dropped by its client stops generating: the next request is not held up."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", hippod.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(
        {"model": "smollm2", "prompt": "Count from one to one hundred.",
         "options": {"temperature": 0, "num_predict": 400}}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.readline()  # first token arrived: the job is running
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = hippod.request("GET", "/api/ps")
        if all(m["hippo"]["busy"] == 0 for m in body["models"]):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the dropped request still holds its lease")
