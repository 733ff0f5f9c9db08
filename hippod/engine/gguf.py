"""Import a llama-family GGUF file as an MLX model directory.

GGUF is how most local models are shared (Ollama, llama.cpp); MLX reads its tensors but mlx_lm
wants a Hugging Face style directory. This module bridges the two: it keeps quantized tensors
quantized (MLX decodes Q4_0/Q4_1/Q8_0 into its own affine format), renames tensors to mlx_lm's
llama names, undoes llama.cpp's rotary row permutation of Q and K, and rebuilds config.json
and the tokenizer from the GGUF metadata.

CLI: ``python -m hippod.engine.gguf SRC DST`` prints one line of JSON; exit 2 on bad input.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

# Bump when the output of convert_gguf changes, so cached conversions are redone.
CONVERTER_VERSION = "1"

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp's llama_ftype (general.file_type) -> the name Ollama shows.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}

# ggml_type ids, used only to name a tensor type MLX cannot decode.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0",
}
# Types MLX can load: the first six as they are (Q4_0/Q4_1/Q8_0 stay quantized), the K-quants
# dequantized to F16 by its bundled gguflib.
MLX_READABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K")

GGUF_TO_HF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_TO_HF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Llama 3's split regex (llama.cpp pre-tokenizer "llama-bpe"), as in its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class GGUFError(ValueError):
    """Bad or unsupported input; the CLI reports it in one line with exit code 2."""


# --------------------------------------------------------------------------- entry point


def convert_gguf(src: Path, dst: Path) -> dict:
    """Convert the GGUF file `src` into an mlx_lm-loadable directory `dst`; return a summary.

    Everything is written into a temporary sibling first and renamed at the end, so a failed
    conversion leaves nothing at `dst`.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(dst)
    weights, meta = read_gguf(src)
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{src}: GGUF metadata lacks general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise GGUFError(f"unsupported architecture {arch!r} (supported: {supported})")

    config = model_config(meta, weights)
    weights = hf_weights(weights, config)
    config.update(quantization_config(weights, config))
    config["gguf_quantization"] = quantization_name(meta, config)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        write_tokenizer(meta, tmp)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary(meta, weights, config)


def summary(meta: dict, weights: dict, config: dict) -> dict:
    """The facts the registry records about an imported model (Ollama's `details`)."""
    parameters = count_parameters(weights, config)
    return {
        "family": "llama",
        "parameters": parameters,
        "parameter_size": meta.get("general.size_label") or format_parameter_size(parameters),
        "quantization": quantization_name(meta, config),
        "context_length": config["max_position_embeddings"],
        "architecture": meta["general.architecture"],
    }


# --------------------------------------------------------------------------- reading


def read_gguf(src: Path) -> tuple[dict, dict]:
    """Load tensors and metadata with MLX; metadata scalars become plain Python values."""
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{src}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        weights, meta = mx.load(str(src), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(_explain_load_failure(src, e)) from None
    return weights, {k: _plain(v) for k, v in meta.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _explain_load_failure(src: Path, error: Exception) -> str:
    """Name the tensor types MLX cannot decode, which is almost always why loading failed."""
    try:
        types = gguf_tensor_types(src)
    except (OSError, ValueError, struct.error):
        return f"{src}: cannot read GGUF file ({error})"
    unknown = sorted({t for t in types.values() if t not in MLX_READABLE_TYPES})
    if unknown:
        return (f"{src}: unsupported tensor type(s) {', '.join(unknown)} "
                f"(MLX reads {', '.join(MLX_READABLE_TYPES)})")
    return f"{src}: cannot read GGUF file ({error})"


def gguf_tensor_types(src: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, read from the GGUF header (MLX does not expose types)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}

    with open(src, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip_string():
            f.seek(read("<Q"), os.SEEK_CUR)

        def skip_value(vtype):
            if vtype == 8:
                skip_string()
            elif vtype == 9:
                item_type, n = read("<I"), read("<Q")
                if item_type in scalar:
                    f.seek(n * struct.calcsize(scalar[item_type]), os.SEEK_CUR)
                else:
                    for _ in range(n):
                        skip_value(item_type)
            elif vtype in scalar:
                f.seek(struct.calcsize(scalar[vtype]), os.SEEK_CUR)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        read("<I")  # version
        n_tensors, n_kv = read("<Q"), read("<Q")
        for _ in range(n_kv):
            skip_string()
            skip_value(read("<I"))
        types = {}
        for _ in range(n_tensors):
            name = f.read(read("<Q")).decode("utf-8", "replace")
            f.seek(8 * read("<I"), os.SEEK_CUR)
            ttype = read("<I")
            read("<Q")  # offset
            types[name] = GGML_TYPES.get(ttype, f"type {ttype}")
        return types


# --------------------------------------------------------------------------- config


def model_config(meta: dict, weights: dict) -> dict:
    """config.json for mlx_lm's llama model, from `<arch>.*` GGUF keys."""
    arch = meta["general.architecture"]

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{name}")
        return value

    if "token_embd.weight" not in weights:
        raise GGUFError("GGUF file has no token_embd tensor")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    vocab_size = meta.get(f"{arch}.vocab_size") or weights["token_embd.weight"].shape[0]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
    }
    rope_scaling = rope_scaling_config(meta, arch, weights, config)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos"):
        if (token_id := meta.get(f"tokenizer.ggml.{name}_token_id")) is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def rope_scaling_config(meta: dict, arch: str, weights: dict, config: dict) -> dict | None:
    """HF rope_scaling from GGUF keys; Llama 3.1's scaling survives only as a rope_freqs tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear" and factor:
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        scaling = {"type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none", "linear", "yarn"):
        raise GGUFError(f"unsupported rope scaling type {kind!r}")
    if "rope_freqs.weight" in weights:
        return llama3_rope_scaling(weights["rope_freqs.weight"], config)
    return None


def llama3_rope_scaling(rope_freqs: mx.array, config: dict) -> dict:
    """Recover Llama 3.1's rope_scaling from the per-frequency factors llama.cpp stores.

    GGUF keeps only the factors, so try the published Llama 3.x parameters and check that they
    reproduce the tensor exactly; anything else is refused rather than guessed.
    """
    stored = [float(x) for x in rope_freqs.astype(mx.float32).tolist()]
    factor = max(stored)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    dims, base = config["head_dim"], config["rope_theta"]
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    expected = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(factor)
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if len(expected) != len(stored) or any(
        abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(expected, stored)
    ):
        raise GGUFError("unsupported rope_freqs tensor (not Llama 3 style rope scaling)")
    return scaling


# --------------------------------------------------------------------------- weights


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> mlx_lm llama name; suffix (.weight/.scales/.biases) is kept."""
    base, _, suffix = gguf_name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        layer, part = m.groups()
        if part in GGUF_TO_HF_LAYER:
            return f"model.layers.{layer}.{GGUF_TO_HF_LAYER[part]}.{suffix}"
    elif base in GGUF_TO_HF_GLOBAL:
        return f"{GGUF_TO_HF_GLOBAL[base]}.{suffix}"
    raise GGUFError(f"unsupported tensor {gguf_name!r} for a llama model")


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's HF->GGUF rotary permutation of Q/K output rows.

    llama.cpp does ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``;
    this is its inverse. Rows are output features and quantization groups run along the
    input dimension, so weight, scales and biases all take the same row permutation.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(weights: dict, config: dict) -> dict:
    out = {}
    for name, w in weights.items():
        if name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        new = hf_name(name)
        if ".self_attn.q_proj." in new:
            w = unpermute_rows(w, config["num_attention_heads"])
        elif ".self_attn.k_proj." in new:
            w = unpermute_rows(w, config["num_key_value_heads"])
        out[new] = w
    return out


def _in_features(module: str, config: dict) -> int:
    if module.endswith("mlp.down_proj"):
        return config["intermediate_size"]
    if module.endswith("self_attn.o_proj"):
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def quantized_modules(weights: dict, config: dict) -> dict[str, dict]:
    """module path -> {"group_size", "bits"}, inferred from packed weight and scales shapes."""
    found = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"].shape[-1]
        in_features = _in_features(module, config)
        found[module] = {"group_size": in_features // scales.shape[-1],
                         "bits": packed * 32 // in_features}
    return found


def quantization_config(weights: dict, config: dict) -> dict:
    """config.json "quantization": the most common (group, bits), plus per-module exceptions.

    llama.cpp often keeps the embedding at a higher precision (Q8_0 next to Q4_1 blocks).
    """
    modules = quantized_modules(weights, config)
    if not modules:
        return {}
    common = Counter((q["group_size"], q["bits"]) for q in modules.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": common[0], "bits": common[1]}
    for module, q in sorted(modules.items()):
        if (q["group_size"], q["bits"]) != common:
            quant[module] = q
    return {"quantization": quant, "quantization_config": quant}


def count_parameters(weights: dict, config: dict) -> int:
    modules = quantized_modules(weights, config)
    total = 0
    for name, w in weights.items():
        module, _, suffix = name.rpartition(".")
        if module in modules:
            if suffix == "weight":
                total += w.shape[0] * _in_features(module, config)
        else:
            total += w.size
    return total


def format_parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"
    return str(n)


def quantization_name(meta: dict, config: dict) -> str:
    file_type = meta.get("general.file_type")
    if file_type in FILE_TYPES:
        return FILE_TYPES[file_type]
    quant = config.get("quantization")
    return f"Q{quant['bits']}" if quant else "F16"


# --------------------------------------------------------------------------- tokenizer


def write_tokenizer(meta: dict, dst: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with chat template) and generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError("GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = byte_level_bpe_tokenizer(meta)
    elif kind == "llama":
        tokenizer = sentencepiece_bpe_tokenizer(meta)
    else:
        raise GGUFError(f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")

    def token(name):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    special = {f"{n}_token": token(n) for n in ("bos", "eos", "unk")}
    special["pad_token"] = token("padding")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        **{k: v for k, v in special.items() if v is not None},
    )
    fast.save_pretrained(str(dst))

    # One home for the template (older transformers read only tokenizer_config.json), and a
    # class name every transformers version resolves.
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config_path = dst / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.update({k: v for k, v in special.items() if v is not None})
    tok_config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    tok_config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    generation = {}
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        generation["bos_token_id"] = int(bos)
    stops = [meta.get(f"tokenizer.ggml.{n}_token_id") for n in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(int(s) for s in stops if s is not None))
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _added_tokens(meta: dict):
    """Control tokens (special) and user-defined tokens, as tokenizers AddedTokens."""
    from tokenizers import AddedToken

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = []
    for text, ttype in zip(tokens, types):
        if ttype in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            added.append(AddedToken(text, special=ttype == TOKEN_TYPE_CONTROL,
                                    normalized=False, single_word=False,
                                    lstrip=False, rstrip=False))
    return added


def _bos_post_processor(meta: dict):
    """Prepend BOS when the GGUF says to; None otherwise."""
    from tokenizers import processors

    tokens = meta["tokenizer.ggml.tokens"]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if bos_id is None or not meta.get("tokenizer.ggml.add_bos_token", False):
        return None
    bos = tokens[bos_id]
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, bos_id)],
    )


def byte_level_bpe_tokenizer(meta: dict):
    """GPT-2 style byte-level BPE (tokenizer.ggml.model == "gpt2")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre in ("llama-bpe", "llama3", "smaug-bpe")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM2's own tokenizer.json: every digit alone, then GPT-2's split.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _bos_post_processor(meta) or processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([t for t in _added_tokens(meta) if t.special])
    tok.add_tokens([t for t in _added_tokens(meta) if not t.special])
    return tok


def sentencepiece_bpe_tokenizer(meta: dict):
    """SentencePiece BPE (tokenizer.ggml.model == "llama"), built like HF's LlamaTokenizerFast.

    GGUF stores pieces and scores but no merges; a merge exists wherever a piece splits into
    two pieces, ranked by the merged piece's score (what SentencePiece itself does).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, piece_id in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece_id], piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    if post := _bos_post_processor(meta):
        tok.post_processor = post
    tok.add_special_tokens([t for t in _added_tokens(meta) if t.special])
    tok.add_tokens([t for t in _added_tokens(meta) if not t.special])
    return tok


# --------------------------------------------------------------------------- files


def _check_destination(dst: Path) -> None:
    if dst.is_dir() and any(dst.iterdir()):
        raise GGUFError(f"{dst}: destination exists and is not empty")
    if dst.exists() and not dst.is_dir():
        raise GGUFError(f"{dst}: destination exists and is not a directory")


def _publish(tmp: Path, dst: Path) -> None:
    """Atomically move the finished directory into place (rename replaces an empty dir)."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, dst)
    except OSError as e:
        raise GGUFError(f"{dst}: cannot move conversion into place ({e.strerror})") from None


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hippod.engine.gguf",
        description="Convert a llama-family GGUF file into an MLX model directory.")
    parser.add_argument("src", type=Path, help="GGUF file")
    parser.add_argument("dst", type=Path, help="output directory (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        result = convert_gguf(args.src, args.dst)
    except GGUFError as e:
        print(f"gguf: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
