"""Tiny GGUF files of every imported family, written the way llama.cpp's converter writes them.

Each builder makes a random mlx_lm model (2 layers, hidden 64), then writes its tensors under
llama.cpp's names (gguf.constants TENSOR_NAMES) with llama.cpp's documented conversion-time
changes applied by hand: the rotary row permutation of Q/K for llama, `1 + w` for Gemma's norms,
fused qkv / gate_up for Phi-3. The importer must undo exactly these for the converted model to
compute what the original does, so the comparison fails on a wrong name, permutation or offset.

Output rows of tokens that decode to non-ASCII text or are special get zero weight, so greedy
generations are plain text that both sides decode identically.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA_LAYER_NAMES = {
    **GGUF_LAYER_NAMES, "pre_feedforward_layernorm": "ffn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "gemma": "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
             "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "mistral": "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
               "[/INST]{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "llama3": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
}


@dataclass
class Spec:
    arch: str               # general.architecture
    module: str             # mlx_lm.models.<module>
    args: dict              # its ModelArgs
    tokenizer: str          # "bpe" or "spm"
    pre: str = "default"    # tokenizer.ggml.pre for bpe
    template: str = "chatml"
    permute_qk: bool = False
    norm_offset: float = 0.0
    extra_meta: dict | None = None


BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6)

SPECS = {
    "llama": Spec("llama", "llama", dict(BASE, model_type="llama", rope_theta=50000.0,
                                         tie_word_embeddings=False),
                  "bpe", pre="llama-bpe", template="llama3", permute_qk=True),
    "mistral": Spec("llama", "llama", dict(BASE, model_type="llama", rope_theta=1e6,
                                           tie_word_embeddings=False),
                    "spm", template="mistral", permute_qk=True),
    "qwen2": Spec("qwen2", "qwen2", dict(BASE, model_type="qwen2", rope_theta=1e6,
                                         tie_word_embeddings=True), "bpe", pre="qwen2"),
    "qwen3": Spec("qwen3", "qwen3", dict(BASE, model_type="qwen3", rope_theta=1e6, head_dim=32,
                                         max_position_embeddings=4096,
                                         tie_word_embeddings=False), "bpe", pre="qwen2"),
    "gemma2": Spec("gemma2", "gemma2", dict(BASE, model_type="gemma2", head_dim=16,
                                            rope_theta=10000.0, query_pre_attn_scalar=16.0,
                                            attn_logit_softcapping=50.0,
                                            final_logit_softcapping=30.0),
                   "spm", template="gemma", norm_offset=1.0,
                   extra_meta={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                               "attention.sliding_window": 4096}),
    # Six layers: mlx_lm's Gemma 3 needs one full sliding-window pattern (5 local, 1 global).
    "gemma3": Spec("gemma3", "gemma3_text", dict(BASE, model_type="gemma3_text", head_dim=16,
                                                 num_hidden_layers=6,
                                                 rope_theta=1e6, query_pre_attn_scalar=16.0,
                                                 sliding_window=512, sliding_window_pattern=6,
                                                 max_position_embeddings=4096),
                   "spm", template="gemma", norm_offset=1.0,
                   extra_meta={"attention.sliding_window": 512}),
    "phi3": Spec("phi3", "phi3", dict(BASE, model_type="phi3", rope_theta=10000.0,
                                      num_key_value_heads=4, max_position_embeddings=4096,
                                      original_max_position_embeddings=4096),
                 "spm", template="phi3", extra_meta={"rope.dimension_count": 16}),
}


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF -> GGUF)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["he", "ll", "hell", "hello", "Ġw"]
    tokens = specials + sorted(ByteLevel.alphabet()) + merged
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, merges, types


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    pieces = ["ll", "he", "llo", "hello", "▁hello", "or", "▁w", "▁wor", "ld", "▁world"]
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    scores = [0.0] * 259 + [-100.0] * len(chars) + [-1.0 - i for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    return tokens, scores, types


def tokenizer_meta(spec: Spec) -> dict:
    """The tokenizer.* keys of the GGUF, as plain values."""
    if spec.tokenizer == "bpe":
        tokens, merges, types = bpe_vocab()
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": spec.pre,
                "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    else:
        tokens, scores, types = spm_vocab()
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_space_prefix": spec.template != "gemma"}
    meta.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                 "tokenizer.chat_template": TEMPLATES[spec.template]})
    return meta


def plain_token_ids(meta: dict) -> list[int]:
    """Ids of tokens that decode to printable ASCII on their own (what generations may emit)."""
    from transformers import AutoTokenizer

    from hippod.engine import gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf.write_tokenizer(meta, Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp)
    special = set(tok.all_special_ids)
    return [i for i in range(len(meta["tokenizer.ggml.tokens"]))
            if i not in special and (text := tok.decode([i])).strip()
            and text.isascii() and text.isprintable()]


def random_model(spec: Spec, vocab_size: int, plain_ids: list[int], seed: int = 7):
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{spec.module}")
    args = module.ModelArgs.from_dict(dict(spec.args, vocab_size=vocab_size))
    mx.random.seed(seed)
    model = module.Model(args)
    keep = mx.zeros((vocab_size, 1)).at[mx.array(plain_ids)].add(1.0)
    weights = []
    for name, w in tree_flatten(model.parameters()):
        if "norm" in name:  # not all ones, so a norm under the wrong name shows in the logits
            low, high = (-0.5, 0.5) if spec.norm_offset else (0.5, 1.5)
            w = mx.random.uniform(low, high, w.shape)
        else:
            w = mx.random.normal(w.shape) * w.shape[-1] ** -0.5
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            tied = "lm_head.weight" not in dict(tree_flatten(model.parameters()))
            if name == "lm_head.weight" or tied:
                w = w * keep
        weights.append((name, w))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def gguf_name(name: str, spec: Spec) -> str:
    module, _, suffix = name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, layer, part = module.split(".", 3)
        names = GEMMA_LAYER_NAMES if spec.norm_offset else GGUF_LAYER_NAMES
        return f"blk.{layer}.{names[part]}.{suffix}"
    return f"{GLOBAL_NAMES[module]}.{suffix}"


def gguf_tensors(model, spec: Spec) -> dict[str, np.ndarray]:
    """The model's tensors as llama.cpp writes them (float32, llama.cpp names and conventions)."""
    args = spec.args
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if ".q_proj." in name and spec.permute_qk:
            w = llama_cpp_permute(w, args["num_attention_heads"])
        elif ".k_proj." in name and spec.permute_qk:
            w = llama_cpp_permute(w, args["num_key_value_heads"])
        elif "norm" in name and spec.norm_offset:
            w = w + spec.norm_offset
        out[gguf_name(name, spec)] = np.array(w.astype(mx.float32))
    return out


def write_gguf(path: Path, spec: Spec, tensors: dict[str, np.ndarray], meta: dict,
               raw: dict[str, tuple[np.ndarray, tuple[int, int], object]] | None = None,
               file_type: int = 0) -> None:
    """Write a GGUF with gguf.GGUFWriter; `raw` holds already-quantized block bytes."""
    import gguf as gg

    a = spec.args
    head_dim = a.get("head_dim", a["hidden_size"] // a["num_attention_heads"])
    w = gg.GGUFWriter(str(path), spec.arch)
    w.add_file_type(file_type)
    w.add_name(f"tiny {spec.template} {spec.arch}")
    arch = spec.arch
    w.add_uint32(f"{arch}.context_length", a.get("max_position_embeddings", 2048))
    w.add_uint32(f"{arch}.embedding_length", a["hidden_size"])
    w.add_uint32(f"{arch}.block_count", a["num_hidden_layers"])
    w.add_uint32(f"{arch}.feed_forward_length", a["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", a["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", a["num_key_value_heads"])
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", a["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", a["rope_theta"])
    for key, value in (spec.extra_meta or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.unknown_token_id" in meta:
        w.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    if "tokenizer.ggml.add_space_prefix" in meta:
        w.add_bool("tokenizer.ggml.add_space_prefix", meta["tokenizer.ggml.add_space_prefix"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    for name, t in tensors.items():
        w.add_tensor(name, t)
    for name, (blocks, shape, qtype) in (raw or {}).items():
        w.add_tensor(name, blocks, raw_dtype=qtype)  # shape from the bytes per row
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build(family: str, path: Path, seed: int = 7):
    """Write `path` as a tiny GGUF of `family`; return (the original mlx_lm model, spec)."""
    spec = SPECS[family]
    meta = tokenizer_meta(spec)
    model = random_model(spec, len(meta["tokenizer.ggml.tokens"]), plain_token_ids(meta), seed)
    write_gguf(path, spec, gguf_tensors(model, spec), meta)
    return model, spec


# --------------------------------------------------------------------------- K-quant blocks


def kquant_blocks(qtype_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed llama.cpp blocks (the gguf package cannot write K-quants).

    Q4_K (144 bytes per 256 values): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128
    bytes of 4-bit values. Q6_K (210 bytes): 128 bytes low 4 bits, 64 bytes high 2 bits, 16
    int8 scales, f16 d. The super-block scales are sized so values spread about like 1/sqrt(cols).
    """
    n = rows * cols // 256
    std = cols ** -0.5
    if qtype_name == "Q4_K":
        body = rng.integers(0, 256, size=(n, 140), dtype=np.uint8)
        d = np.full((n, 1), 2 * std / (15 * 32), dtype=np.float16).view(np.uint8)
        dmin = np.full((n, 1), std / 32, dtype=np.float16).view(np.uint8)
        blocks = np.concatenate([d, dmin, body], axis=1)
    elif qtype_name == "Q6_K":
        body = rng.integers(0, 256, size=(n, 192), dtype=np.uint8)
        # Neighbouring sub-blocks of real weights have similar scales.
        scales = rng.integers(40, 64, size=(n, 16)).astype(np.int8).view(np.uint8)
        d = np.full((n, 1), std / (32 * 52), dtype=np.float16).view(np.uint8)
        blocks = np.concatenate([body, scales, d], axis=1)
    else:
        raise ValueError(qtype_name)
    return blocks.reshape(rows, -1)


Q4_K_M_LAYOUT = {  # llama.cpp's Q4_K_M mix: Q6_K for output, attn_v and ffn_down, Q4_K else
    "token_embd": "Q4_K", "output": "Q6_K", "attn_v": "Q6_K", "ffn_down": "Q6_K",
}


def build_q4_k_m(path: Path, seed: int = 3) -> tuple[Spec, dict]:
    """A llama (hidden 256: K-quant super-blocks need 256 columns) laid out like Q4_K_M.

    Returns the spec and {gguf name: float32 values} dequantized by the gguf package, the
    weights an independent float construction of the model uses.
    """
    import gguf as gg

    spec = Spec("llama", "llama", dict(BASE, model_type="llama", hidden_size=256,
                                       intermediate_size=512, rope_theta=10000.0,
                                       tie_word_embeddings=False),
                "bpe", pre="llama-bpe", template="llama3", permute_qk=True)
    meta = tokenizer_meta(spec)
    model = random_model(spec, len(meta["tokenizer.ggml.tokens"]), plain_token_ids(meta), seed)
    rng = np.random.default_rng(seed)
    floats, raw, dequantized = {}, {}, {}
    for name, values in gguf_tensors(model, spec).items():
        if values.ndim == 1:
            floats[name] = values
            dequantized[name] = values
            continue
        part = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = getattr(gg.GGMLQuantizationType, Q4_K_M_LAYOUT.get(part, "Q4_K"))
        blocks = kquant_blocks(qtype.name, *values.shape, rng)
        raw[name] = (blocks, values.shape, qtype)
        dequantized[name] = gg.quants.dequantize(blocks, qtype).reshape(values.shape)
    write_gguf(path, spec, floats, meta, raw=raw, file_type=15)
    return spec, dequantized
