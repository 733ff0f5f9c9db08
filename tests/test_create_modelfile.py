"""Ollama's /api/create with Modelfile data and /api/show giving it back, through the ollama client.

Every documented field of both endpoints is either honoured (and checked here through what the
model then does or shows) or refused with a 400 that names it.
"""

from __future__ import annotations

import json

import ollama
import pytest

GO_CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
             "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
             "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
PARAMETERS = {"temperature": 0.3, "top_k": 20, "top_p": 0.8, "num_ctx": 1024, "seed": 42,
              "num_predict": 12, "repeat_penalty": 1.1, "stop": ["<|im_end|>", "User:"]}
MESSAGES = [{"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A pirate, arr."}]


@pytest.fixture(scope="module")
def client(hippod):
    return ollama.Client(host=hippod.url)


def show_raw(hippod, name: str, **extra) -> dict:
    """/api/show as JSON (the ollama client's ShowResponse has no `system` or `messages`)."""
    status, body = hippod.request("POST", "/api/show", {"model": name, **extra})
    assert status == 200, body
    return body


def rendered(hippod, name: str, messages: list[dict]) -> str:
    """What the engine feeds the model: the stored chat template rendered by transformers."""
    from transformers import AutoTokenizer

    status, body = hippod.request("POST", "/api/show", {"model": name})
    assert status == 200, body
    tok = AutoTokenizer.from_pretrained(str(hippod.home / "models" / body["hippo"]["digest"]))
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_create_stores_every_modelfile_field_and_show_gives_it_back(client, hippod):
    client.create(model="pirate", from_="smollm2", template=GO_CHATML,
                  system="You are a pirate.", parameters=PARAMETERS, messages=MESSAGES,
                  license="MIT License\nCopyright hippo")
    shown, raw = client.show("pirate"), show_raw(hippod, "pirate")
    assert shown.template == GO_CHATML
    assert raw["system"] == "You are a pirate."
    assert shown.license == "MIT License\nCopyright hippo"
    lines = [line.split(None, 1) for line in shown.parameters.splitlines()]
    assert ["temperature", "0.3"] in lines and ["top_k", "20"] in lines
    assert ["stop", '"<|im_end|>"'] in lines and ["stop", '"User:"'] in lines
    assert ["num_ctx", "1024"] in lines and ["seed", "42"] in lines
    assert raw["messages"] == MESSAGES
    mf = shown.modelfile
    for line in ("FROM ", 'PARAMETER temperature 0.3', 'PARAMETER stop "User:"',
                 'SYSTEM """You are a pirate."""', f'TEMPLATE """{GO_CHATML}"""',
                 'MESSAGE user """Who are you?"""', 'LICENSE """MIT License'):
        assert line in mf, (line, mf)
    assert "completion" in shown.capabilities
    assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"

    # The Go template became the model's chat template: rendered like Ollama renders it.
    got = rendered(hippod, "pirate", [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": "bye"}])
    assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                   "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
                   "<|im_start|>assistant\n")
    reply = client.chat(model="pirate", messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 4, "temperature": 0})
    assert reply.done


def test_a_model_created_from_another_inherits_and_overrides(client, hippod):
    client.create(model="pirate-base", from_="smollm2", system="You are a pirate.",
                  parameters={"temperature": 0.3, "top_k": 20})
    client.create(model="pirate-hot", from_="pirate-base", parameters={"temperature": 0.9})
    shown = client.show("pirate-hot")
    assert show_raw(hippod, "pirate-hot")["system"] == "You are a pirate."
    lines = [line.split(None, 1) for line in shown.parameters.splitlines()]
    assert ["temperature", "0.9"] in lines and ["top_k", "20"] in lines
    assert client.show("pirate-base").parameters.count("temperature") == 1
    assert ["temperature", "0.3"] in [line.split(None, 1) for line in
                                      client.show("pirate-base").parameters.splitlines()]


def create_error(hippod, body: dict) -> tuple[int, str]:
    status, answer = hippod.request("POST", "/api/create", dict(body, stream=False))
    return status, answer.get("error", "") if isinstance(answer, dict) else str(answer)


@pytest.mark.parametrize("field,value,named", [
    ("adapters", {"lora.gguf": "sha256:" + "0" * 64}, "adapters"),
    ("quantize", "iq2_xxs", "iq2_xxs"),
    ("parameters", {"bogus_knob": 1}, "bogus_knob"),
    ("parameters", {"temperature": "hot"}, "parameters.temperature"),
    ("parameters", {"mirostat": 2}, "mirostat"),
    ("parameters", "temperature 1", "parameters"),
    ("template", '{{ template "other" . }}', "template"),
    ("template", '{{ printf "%q" .System }}', "%q"),
    ("template", "{{ if .System }}unclosed", "unclosed"),
    ("template", "{{ .Nonsense }}", ".Nonsense"),
    ("system", 7, "system"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": "x", "images": ["aGk="]}], "images"),
    ("messages", "hi", "messages"),
    ("license", 5, "license"),
    ("files", {"model.gguf": "md5:abc"}, "files"),
    ("files", {"../escape.gguf": "sha256:" + "0" * 64}, "unsafe file name"),
    ("files", {"model.gguf": "sha256:" + "1" * 64}, "not found"),
    ("modelfile", "FROM smollm2", "modelfile"),
    ("renderer", "qwen3-coder", "renderer"),
    ("parser", "qwen3-coder", "parser"),
    ("frobnicate", True, "frobnicate"),
])
def test_each_bad_create_field_is_a_400_naming_it(hippod, field, value, named):
    status, error = create_error(hippod, {"model": "bad-field", "from": "smollm2", field: value})
    assert status == 400 and named in error, (status, error)
    assert hippod.request("POST", "/api/show", {"model": "bad-field"})[0] == 404


def test_quantize_of_a_quantized_model_is_refused_and_leaves_nothing(hippod):
    status, error = create_error(hippod, {"model": "requant", "from": "smollm2",
                                          "quantize": "q8_0"})
    assert status == 400 and "already quantized" in error, error
    assert hippod.request("POST", "/api/show", {"model": "requant"})[0] == 404


def test_a_failed_create_keeps_the_model_it_would_replace(client, hippod):
    client.create(model="keeper", from_="smollm2", system="original")
    status, _ = create_error(hippod, {"model": "keeper", "from": "smollm2", "quantize": "q4_0"})
    assert status == 400
    assert show_raw(hippod, "keeper")["system"] == "original"


@pytest.mark.parametrize("level,bits,group", [("q4_K_M", 4, 64), ("q8_0", 8, 32)])
def test_quantize_makes_mlx_affine_weights(client, hippod, tiny_model_dir, level, bits, group):
    name = f"tiny-{level.lower()}"
    client.create(model=name, from_=str(tiny_model_dir), quantize=level)
    shown = client.show(name)
    assert shown.details.quantization_level == f"{bits}-bit"
    digest = hippod.request("POST", "/api/show", {"model": name})[1]["hippo"]["digest"]
    config = json.loads((hippod.home / "models" / digest / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (bits, group)
    if bits == 4:  # one of them runs, to show the runner loads what the quantizer wrote
        reply = client.generate(model=name, prompt="hi", options={"num_predict": 3})
        assert reply.done and reply.eval_count >= 1
    client.delete(name)


def test_show_verbose_lists_tensors_and_the_vocabulary(client, hippod):
    plain = client.show("smollm2")
    assert plain.modelinfo["tokenizer.ggml.tokens"] == [] and "tensors" not in show_raw(
        hippod, "smollm2")
    full = show_raw(hippod, "smollm2", verbose=True)
    assert len(full["model_info"]["tokenizer.ggml.tokens"]) == 49152
    assert full["model_info"]["llama.block_count"] == 30
    assert full["model_info"]["llama.attention.head_count_kv"] == 3
    assert full["model_info"]["general.file_type"] == 3  # Q4_1
    assert full["model_info"]["tokenizer.ggml.pre"] == "smollm"
    types = full["model_info"]["tokenizer.ggml.token_type"]
    assert len(types) == 49152 and types[0] == 3 and types[1000] == 1
    tensors = {t["name"]: t for t in full["tensors"]}
    assert tensors["model.embed_tokens.weight"]["type"] == "U32"


def test_show_refuses_what_it_does_not_take(hippod):
    status, body = hippod.request("POST", "/api/show", {"model": "smollm2", "options": {"x": 1}})
    assert status == 400 and "options" in body["error"]
    status, body = hippod.request("POST", "/api/show", {"model": "smollm2", "verbose": "yes"})
    assert status == 400 and "verbose" in body["error"]
    status, body = hippod.request("POST", "/api/show", {"model": "no-such-model"})
    assert status == 404


def test_files_from_uploaded_blobs_through_the_ollama_client(client, hippod, tmp_path):
    import hashlib
    import urllib.request

    from tests import gguf_builders as gb

    gb.build("qwen2", tmp_path / "qwen.gguf")
    data = (tmp_path / "qwen.gguf").read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    head = urllib.request.Request(f"{hippod.url}/api/blobs/{digest}", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(head)
    assert e.value.code == 404
    assert client.create_blob(tmp_path / "qwen.gguf") == digest
    assert urllib.request.urlopen(head).status == 200

    client.create(model="from-blobs", files={"qwen.gguf": digest}, system="uploaded")
    assert client.show("from-blobs").details.family == "qwen2"
    assert show_raw(hippod, "from-blobs")["system"] == "uploaded"

    wrong = "sha256:" + "ab" * 32
    req = urllib.request.Request(f"{hippod.url}/api/blobs/{wrong}", data=b"not it", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "mismatch" in json.loads(e.value.read())["error"]
    req = urllib.request.Request(f"{hippod.url}/api/blobs/../../etc", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code in (400, 404)
    assert not list((hippod.home / "tmp").glob("upload-*"))
