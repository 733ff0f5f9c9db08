"""GGUF families and K-quants: tiny files of each family, imported and run against mlx_lm.

The GGUFs are written by tests/gguf_builders.py from random mlx_lm models with llama.cpp's
names and conventions, so the importer must undo each family's changes to match.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import ollama
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler

from hippod.engine import gguf
from tests import gguf_builders as gb

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
MESSAGES = [{"role": "user", "content": "hello world"}]


def greedy_text(model, tokenizer, n: int) -> str:
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = []
    for token, _ in zip(generate_step(mx.array(ids), model, sampler=make_sampler(temp=0.0)),
                        range(n)):
        out.append(int(token[0]))
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (gguf path, original model, converted dir), built once for the module."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        path = root / f"{family}.gguf"
        model, _ = gb.build(family, path)
        out[family] = (path, model)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_to_the_same_function(built, tmp_path, family):
    path, original = built[family]
    info = gguf.convert_gguf(path, tmp_path / "out")
    assert info["architecture"] == gb.SPECS[family].arch and info["quantization"] == "F32"
    assert info["parameters"] == sum(v.size for _, v in tree_flatten(original.parameters()))
    converted, tokenizer = load(str(tmp_path / "out"))
    assert type(converted).__module__ == type(original).__module__
    ids = mx.array([[1, 70, 200, 259, 261, 5, 2, 100]])
    expected, got = original(ids), converted(ids)
    assert mx.allclose(expected, got, atol=1e-4).item(), mx.abs(expected - got).max().item()
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "hello world" in rendered and rendered != "hello world"
    assert tokenizer.decode(tokenizer.encode("hello world", add_special_tokens=False)) \
        == "hello world"


def test_the_gguf_holds_llama_cpp_conventions_not_mlx_lms(built):
    # Without this the equality above could hold for an importer that changes nothing.
    from gguf import GGUFReader

    for family, name, hf in (("llama", "blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj"),
                             ("gemma2", "blk.0.attn_norm.weight", "model.layers.0.input_layernorm")):
        path, original = built[family]
        stored = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}[name]
        mine = np.array(dict(tree_flatten(original.parameters()))[f"{hf}.weight"])
        assert stored.shape == mine.shape and not np.allclose(stored, mine)


def test_each_family_imports_through_hippod_and_generates_mlx_lms_tokens(hippod, built,
                                                                         tmp_path):
    client = ollama.Client(host=hippod.url)
    for family in FAMILIES:
        path, original = built[family]
        name = f"tiny-{family}"
        client.create(model=name, from_=str(path))
        shown = client.show(name)
        assert shown.details.family == gb.SPECS[family].arch
        assert "messages" in shown.template or "Messages" in shown.template
        reply = client.chat(model=name, messages=MESSAGES,
                            options={"temperature": 0, "num_predict": 8})
        _, tokenizer = load(str(hippod.home / "models" / digest_of(hippod, name)))
        expected = greedy_text(original, tokenizer, 8)
        assert len(expected) >= 8 and reply.message.content == expected, family
        client.delete(name)


def digest_of(hippod, name: str) -> str:
    status, body = hippod.request("POST", "/api/show", {"model": name})
    assert status == 200, body
    return body["hippo"]["digest"]


def test_unsupported_architecture_is_a_400_naming_it(hippod, tmp_path):
    spec = gb.SPECS["llama"]
    meta = gb.tokenizer_meta(spec)
    model = gb.random_model(spec, len(meta["tokenizer.ggml.tokens"]), [3, 4, 5])
    tensors = gb.gguf_tensors(model, spec)
    bad = gb.Spec("falcon", "llama", spec.args, "bpe")
    gb.write_gguf(tmp_path / "falcon.gguf", bad, tensors, meta)
    status, body = hippod.request("POST", "/api/create", {
        "model": "falcon", "from": str(tmp_path / "falcon.gguf"), "stream": False})
    assert status == 400 and "unsupported architecture 'falcon'" in body["error"], body
    assert "qwen3" in body["error"]  # it says what is supported


# --------------------------------------------------------------------------- K-quants


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    root = tmp_path_factory.mktemp("q4km")
    spec, dequantized = gb.build_q4_k_m(root / "q4km.gguf")
    info = gguf.convert_gguf(root / "q4km.gguf", root / "out")
    return root, spec, dequantized, info


def test_q4_k_m_stays_quantized_and_small(q4_k_m):
    root, _, _, info = q4_k_m
    assert info["quantization"] == "Q4_K_M"
    on_disk = sum(p.stat().st_size for p in (root / "out").iterdir())
    ratio = on_disk / (root / "q4km.gguf").stat().st_size
    assert ratio <= 1.2, ratio
    model, _ = load(str(root / "out"))
    layer = model.model.layers[0]
    assert (layer.self_attn.q_proj.bits, layer.mlp.up_proj.bits, model.model.embed_tokens.bits) \
        == (4, 4, 4)  # Q4_K: 4-bit
    assert (layer.self_attn.v_proj.bits, layer.mlp.down_proj.bits, model.lm_head.bits) \
        == (6, 6, 6)  # Q6_K: 6-bit


def independent_float_model(spec, dequantized, vocab_size):
    """mlx_lm's llama on the gguf package's dequantized values, renamed and unpermuted here."""
    args = llama.ModelArgs.from_dict(dict(spec.args, vocab_size=vocab_size))
    model = llama.Model(args)
    names = {v: k for k, v in gb.GGUF_LAYER_NAMES.items()}
    names.update({"ffn_up": "mlp.up_proj", "ffn_norm": "post_attention_layernorm"})
    globals_ = {v: k for k, v in gb.GLOBAL_NAMES.items()}
    weights = []
    for name, values in dequantized.items():
        w = mx.array(values)
        parts = name.split(".")
        if parts[0] == "blk":
            heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
            if parts[2] in heads:  # inverse of llama.cpp's permutation
                n = heads[parts[2]]
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            weights.append((f"model.layers.{parts[1]}.{names[parts[2]]}.weight", w))
        else:
            weights.append((f"{globals_[parts[0]]}.weight", w))
    model.load_weights(weights)
    return model


def test_q4_k_m_computes_what_the_gguf_holds(q4_k_m):
    root, spec, dequantized, _ = q4_k_m
    converted, tokenizer = load(str(root / "out"))
    params = dict(tree_flatten(converted.parameters()))
    # Q4_K is repacked, not requantized: the MLX weights are the GGUF's values.
    q = "model.layers.1.self_attn.q_proj"
    got = mx.dequantize(params[f"{q}.weight"], params[f"{q}.scales"], params[f"{q}.biases"],
                        group_size=32, bits=4)
    n = spec.args["num_attention_heads"]
    want = mx.array(dequantized["blk.1.attn_q.weight"])
    want = want.reshape(n, want.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(want.shape)
    assert mx.abs(got - want).max().item() <= 2e-3 * mx.abs(want).max().item()

    reference = independent_float_model(spec, dequantized, len(tokenizer.vocab))
    ids = mx.array([[1, 70, 200, 259, 261, 5, 2, 100]])
    expected, logits = reference(ids), converted(ids)
    assert mx.abs(expected - logits).max().item() < 0.05 * mx.abs(expected).max().item()
    assert expected.argmax(-1).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_types_are_repacked_exactly(qtype):
    from gguf import GGMLQuantizationType, quants

    from hippod.engine.gguf_tensors import EXACT_BITS, convert_tensor

    t = getattr(GGMLQuantizationType, qtype)
    values = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    blocks = quants.quantize(values, t)
    arrays, bits = convert_tensor(t, blocks, values.shape, quantizable=True)
    assert bits == EXACT_BITS[t]
    got = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group_size=32,
                        bits=bits)
    want = mx.array(quants.dequantize(blocks, t))
    assert mx.abs(got - want).max().item() <= 2e-3 * mx.abs(want).max().item()
    # Not quantizable (a norm, say): dequantized to float16 instead.
    arrays, bits = convert_tensor(t, blocks, values.shape, quantizable=False)
    assert bits is None and arrays["weight"].dtype == mx.float16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_packing(bits):
    from hippod.engine.gguf_tensors import pack_bits

    q = np.random.default_rng(bits).integers(0, 2**bits, size=(4, 64)).astype(np.uint8)
    ones, zeros = mx.ones((4, 2), dtype=mx.float16), mx.zeros((4, 2), dtype=mx.float16)
    out = mx.dequantize(mx.array(pack_bits(q, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(out).astype(np.uint8), q)
