"""The GGUF importer: real SmolLM2 end to end, synthetic GGUFs for exact checks, bad input."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler

from hippod.engine import gguf
from tests.gguf_builders import bpe_vocab, llama_cpp_permute
from tests.modelfiles import REPO_ROOT, make_tiny_llama, smollm2_gguf, smollm2_mlx_dir


def run_cli(src: Path, dst: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hippod.engine.gguf", str(src), str(dst)],
                          cwd=REPO_ROOT, capture_output=True, text=True)


def greedy(model, tokenizer, prompt, max_tokens):
    return generate(model, tokenizer, prompt, max_tokens=max_tokens,
                    sampler=make_sampler(temp=0.0))


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return smollm2_mlx_dir()


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def test_cli_prints_one_json_summary_line(tmp_path):
    dst = tmp_path / "smol"
    proc = run_cli(smollm2_gguf(), dst)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert info == {"family": "llama", "parameters": info["parameters"], "parameter_size": "135M",
                    "quantization": "Q4_1", "context_length": 8192, "architecture": "llama",
                    "file_type": 3, "tokenizer_pre": "smollm"}
    assert 130_000_000 < info["parameters"] < 140_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]  # no temporary left behind
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (30, 9, 3)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smol_dir):
    model, tokenizer = load(str(smol_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = greedy(model, tokenizer, prompt, max_tokens=16)
    assert "Paris" in answer, answer


def test_tokenizer_round_trips_digits_and_unicode(smol_tokenizer):
    text = "Année 2024: naïve café — 東京 🙂 x=3.14159\n\tend"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    assert smol_tokenizer.decode(ids) == text
    # SmolLM2 splits numbers into single digits.
    digits = smol_tokenizer.encode("2024", add_special_tokens=False)
    assert [smol_tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_smollm_pre_tokenizer_matches_smollm2s_own(smol_dir):
    # Its vocabulary has no multi-digit tokens, so only the structure shows the Digits step.
    pre = json.loads((smol_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True
    assert pre["pretokenizers"][1]["add_prefix_space"] is False


def test_llama_bpe_pre_tokenizer_groups_digits_by_three():
    tokens, merges, types = bpe_vocab()
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.pre": "llama-bpe"}
    tok = gguf.byte_level_bpe_tokenizer(meta)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("hello 12345 world's")]
    assert pieces == ["hello", "Ġ", "123", "45", "Ġworld", "'s"]


def test_chat_template_and_special_tokens(smol_tokenizer):
    _, meta = mx.load(str(smollm2_gguf()), return_metadata=True)
    rendered = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.count("<|im_start|>") == 3 and rendered.endswith("<|im_start|>assistant\n")
    ids = smol_tokenizer.encode(rendered, add_special_tokens=False)
    im_start = smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # markers are single special tokens, not split text
    eos_id = meta["tokenizer.ggml.eos_token_id"].item()
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smol_tokenizer.eos_token_id == eos_id == im_end


# --------------------------------------------------------------------------- synthetic GGUFs


GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def to_gguf_name(name: str) -> str:
    module = name.removesuffix(".weight")
    if module.startswith("model.layers."):
        _, _, layer, part = module.split(".", 3)
        return f"blk.{layer}.{GGUF_LAYER_NAMES[part]}.weight"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
            "lm_head": "output"}[module] + ".weight"


def write_tiny_gguf(path: Path, *, tie: bool, architecture: str = "llama") -> llama.Model:
    """A float32 llama written the way llama.cpp writes one; returns the original model."""
    tokens, merges, types = bpe_vocab()
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-6, vocab_size=len(tokens), rope_theta=50000.0,
                           tie_word_embeddings=tie)
    mx.random.seed(7)
    model = llama.Model(args)
    # Norms not all ones, so a norm under the wrong name shows in the logits.
    model.load_weights([(k, mx.random.uniform(0.5, 1.5, v.shape))
                        for k, v in tree_flatten(model.parameters()) if "norm" in k], strict=False)
    tensors = {}
    for name, w in tree_flatten(model.parameters()):
        if ".q_proj." in name:
            w = llama_cpp_permute(w, args.num_attention_heads)
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, args.num_key_value_heads)
        tensors[to_gguf_name(name)] = w
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": architecture,
        "general.file_type": u32(0),
        "llama.block_count": u32(2), "llama.embedding_length": u32(64),
        "llama.feed_forward_length": u32(96), "llama.attention.head_count": u32(4),
        "llama.attention.head_count_kv": u32(2), "llama.context_length": u32(1024),
        "llama.rope.freq_base": mx.array(50000.0, dtype=mx.float32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-6, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template":
            "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    mx.save_gguf(str(path), tensors, meta)
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_converted_model_computes_what_the_original_did(tmp_path, tie):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    info = gguf.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert info["architecture"] == "llama" and info["quantization"] == "F32"
    assert info["parameters"] == sum(v.size for _, v in tree_flatten(original.parameters()))

    converted, tokenizer = load(str(tmp_path / "out"))
    ids = mx.array([[1, 70, 200, 259, 261, 5, 2, 100]])
    expected, got = original(ids), converted(ids)
    assert mx.allclose(expected, got, atol=1e-4).item(), mx.abs(expected - got).max().item()

    assert tokenizer.encode("hello world") == [tokenizer.convert_tokens_to_ids(t)
                                               for t in ("hello", "Ġw", "o", "r", "l", "d")]
    assert tokenizer.eos_token_id == 2


def test_unpermute_inverts_llama_cpp_permutation_on_quantized_rows():
    w = mx.random.normal((12 * 8, 64))
    q, scales, biases = mx.quantize(w, group_size=32, bits=4)
    for t in (w, q, scales, biases):
        assert mx.array_equal(gguf.unpermute_rows(llama_cpp_permute(t, 3), 3), t).item()


def test_unsupported_architecture_exits_2(tmp_path):
    write_tiny_gguf(tmp_path / "x.gguf", tie=True, architecture="gpt2")
    proc = run_cli(tmp_path / "x.gguf", tmp_path / "out")
    assert proc.returncode == 2
    assert "unsupported architecture 'gpt2'" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_exits_2_and_leaves_dst_untouched(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    dst = tmp_path / "out"
    proc = run_cli(src, dst)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "not a GGUF file" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    write_tiny_gguf(src, tie=True)  # now a good GGUF, but dst is taken
    proc = run_cli(src, dst)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_unsupported_tensor_type_is_named(tmp_path):
    # A hand-written GGUF v3 holding one IQ2_XXS tensor (ggml type 16), which hippo cannot import.
    name = b"token_embd.weight"
    header = (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
              + struct.pack("<IQIQ", 1, 256, 16, 0))
    src = tmp_path / "iq2.gguf"
    src.write_bytes(header + b"\0" * (-len(header) % 32) + b"\0" * 66)
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2
    assert "unsupported tensor type(s) IQ2_XXS" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_llama3_rope_scaling_is_recovered_from_rope_freqs():
    # llama.cpp's LlamaModel.generate_extra_tensors for Llama 3.1 (factor 8, 1, 4, 8192).
    base, dim, factor = 500000.0, 128, 8.0
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / dim))
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    config = {"head_dim": dim, "rope_theta": base}
    scaling = gguf.llama3_rope_scaling(mx.array(factors), config)
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    with pytest.raises(gguf.GGUFError):
        gguf.llama3_rope_scaling(mx.array(factors[::-1]), config)


def sentencepiece_meta(add_bos: bool) -> dict:
    pieces = ["ll", "he", "llo", "hello", "▁hello", "or", "▁w", "▁wor", "ld", "▁world"]
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces)
    scores = [0.0] * 259 + [-100.0] * len(chars) + [-1.0 - i for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": add_bos}


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_tokenizer(tmp_path, add_bos):
    from transformers import AutoTokenizer

    gguf.write_tokenizer(sentencepiece_meta(add_bos), tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["<s>"] * add_bos + ["▁hello", "▁world"]
    text = "hello wörld héllo"  # ö and é exist only as byte pieces
    ids = tok.encode(text, add_special_tokens=False)
    assert "<0xC3>" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"


# --------------------------------------------------------------------------- tiny llama


@pytest.mark.parametrize("quantize", [False, True], ids=["f16", "q4"])
def test_tiny_llama_loads_generates_and_is_deterministic(tmp_path, quantize):
    a = make_tiny_llama(tmp_path / "a", seed=0, quantize=quantize)
    b = make_tiny_llama(tmp_path / "b", seed=0, quantize=quantize)
    c = make_tiny_llama(tmp_path / "c", seed=1, quantize=quantize)
    weights = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b) and weights(a) != weights(c)

    outputs = []
    for d in (a, b):
        model, tokenizer = load(str(d))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                               add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(prompt)
        tokens = [t for t, _ in zip(_greedy_tokens(model, ids), range(4))]
        outputs.append(tokens)
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1]
    if quantize:
        assert model.model.layers[0].self_attn.q_proj.bits == 4


def _greedy_tokens(model, ids):
    from mlx_lm.generate import generate_step

    for token, _ in generate_step(mx.array(ids), model, sampler=make_sampler(temp=0.0)):
        yield int(token)
