"""Import a GGUF file (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3) as an MLX model.

GGUF is how most local models are shared (Ollama, llama.cpp); mlx_lm wants a Hugging Face style
directory. This module bridges the two: it reads the file with the `gguf` package, keeps
quantized tensors quantized as MLX affine weights (gguf_tensors), renames tensors to mlx_lm's
names and undoes llama.cpp's conversion-time changes (gguf_families), and rebuilds config.json
and the tokenizer from the GGUF metadata.

CLI: ``python -m hippod.engine.gguf SRC DST`` prints one line of JSON; exit 2 on bad input.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from hippod import lifeline
from hippod.engine.gguf_families import FAMILIES, Family
from hippod.engine.gguf_tensors import SUPPORTED_TYPES, convert_tensor

# Bump when the output of convert_gguf changes, so cached conversions are redone.
CONVERTER_VERSION = "2"

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# llama.cpp's llama_ftype (general.file_type) -> the name Ollama shows.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 25: "IQ4_NL", 30: "IQ4_XS", 32: "BF16",
}

# ggml_type ids, to name a tensor type before handing the file to the gguf reader.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

# Llama 3's split regex (llama.cpp pre-tokenizer "llama-bpe"), as in its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 2/3's split regex (pre-tokenizer "qwen2"): digits one by one.
QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class GGUFError(ValueError):
    """Bad or unsupported input; the CLI reports it in one line with exit code 2."""


class Tensor:
    """One GGUF tensor: its ggml type, numpy-order shape and raw (memory-mapped) data."""

    def __init__(self, reader_tensor):
        self.qtype = reader_tensor.tensor_type
        self.shape = tuple(int(x) for x in reversed(reader_tensor.shape.tolist()))
        self.data = reader_tensor.data

    def floats(self) -> mx.array:
        from gguf import quants

        return mx.array(quants.dequantize(np.asarray(self.data), self.qtype).reshape(self.shape))


# --------------------------------------------------------------------------- entry point


def convert_gguf(src: Path, dst: Path) -> dict:
    """Convert the GGUF file `src` into an mlx_lm-loadable directory `dst`; return a summary.

    Everything is written into a temporary sibling first and renamed at the end, so a failed
    conversion leaves nothing at `dst`.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(dst)
    tensors, meta = read_gguf(src)
    family = family_of(meta, src)
    config = model_config(meta, tensors, family)
    weights, quantized, parameters = hf_weights(tensors, config, family)
    config.update(quantization_config(quantized))
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
    return summary(meta, parameters, config)


def family_of(meta: dict, src: Path) -> Family:
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{src}: GGUF metadata lacks general.architecture")
    if arch not in FAMILIES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise GGUFError(f"unsupported architecture {arch!r} (supported: {supported})")
    return FAMILIES[arch]


def summary(meta: dict, parameters: int, config: dict) -> dict:
    """The facts the registry records about an imported model (Ollama's `details`)."""
    return {
        "family": meta["general.architecture"],
        "parameters": parameters,
        "parameter_size": meta.get("general.size_label") or format_parameter_size(parameters),
        "quantization": quantization_name(meta, config),
        "context_length": config["max_position_embeddings"],
        "architecture": meta["general.architecture"],
        "file_type": meta.get("general.file_type"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
    }


# --------------------------------------------------------------------------- reading


def read_gguf(src: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata (plain Python values) with the `gguf` package's reader."""
    from gguf import GGUFReader

    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{src}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        types = gguf_tensor_types(src)
    except (OSError, ValueError, struct.error, MemoryError) as e:
        raise GGUFError(f"{src}: cannot read GGUF file ({e})") from None
    unknown = sorted({t for t in types.values() if t not in SUPPORTED_TYPES})
    if unknown:
        raise GGUFError(f"{src}: unsupported tensor type(s) {', '.join(unknown)} "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    try:
        reader = GGUFReader(src, "r")
        meta = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
        tensors = {t.name: Tensor(t) for t in reader.tensors}
    except (OSError, ValueError, IndexError, struct.error) as e:
        raise GGUFError(f"{src}: cannot read GGUF file ({e})") from None
    return tensors, meta


def gguf_tensor_types(src: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, read from the GGUF header alone."""
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


def model_config(meta: dict, tensors: dict[str, Tensor], family: Family) -> dict:
    """config.json for the family's mlx_lm model, from `<arch>.*` GGUF keys."""
    arch = meta["general.architecture"]
    missing = object()

    def key(name, default=missing):
        value = meta.get(f"{arch}.{name}")
        if value is None:
            if default is missing:
                raise GGUFError(f"GGUF metadata lacks {arch}.{name}")
            return default
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF file has no token_embd tensor")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    vocab_size = key("vocab_size", None) or tensors["token_embd.weight"].shape[0]
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if family.model_type == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
        if sliding := key("attention.sliding_window", None):
            config["sliding_window"] = int(sliding)
    rope_scaling = rope_scaling_config(key, tensors, config)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    config.update(family.extra_config(key, config, tensors))
    for name in ("bos", "eos", "padding"):
        if (token_id := meta.get(f"tokenizer.ggml.{name}_token_id")) is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = int(token_id)
    # transformers' own default pad id (Phi-3's 32000) may lie outside a GGUF's vocabulary.
    config.setdefault("pad_token_id", config.get("eos_token_id"))
    return config


def rope_scaling_config(key, tensors: dict[str, Tensor], config: dict) -> dict | None:
    """HF rope_scaling from GGUF keys; Llama 3.1's scaling survives only as a rope_freqs tensor."""
    kind = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", None)
    original = key("rope.scaling.original_context_length", None)
    if kind == "linear" and factor:
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        scaling = {"type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none", "linear", "yarn", "longrope"):
        raise GGUFError(f"unsupported rope scaling type {kind!r}")
    if "rope_freqs.weight" in tensors:
        return llama3_rope_scaling(tensors["rope_freqs.weight"].floats(), config)
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


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's HF->GGUF rotary permutation of Q/K output rows.

    llama.cpp does ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``;
    this is its inverse. Rows are output features and quantization groups run along the
    input dimension, so weight, scales and biases all take the same row permutation.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tensors: dict[str, Tensor], config: dict, family: Family
               ) -> tuple[dict[str, mx.array], dict[str, int], int]:
    """mlx_lm weights, {module: MLX bits} of the quantized ones, and the parameter count."""
    out, quantized, parameters = {}, {}, 0
    arch = config["model_type"]
    for name, tensor in tensors.items():
        if name in family.config_tensors:
            continue  # folded into config.json
        new = family.hf_name(name)
        if new is None:
            raise GGUFError(f"unsupported tensor {name!r} for a {arch} model")
        module, _, suffix = new.rpartition(".")
        is_norm = "norm" in module.rsplit(".", 1)[-1]
        quantizable = suffix == "weight" and not is_norm and len(tensor.shape) == 2
        try:
            arrays, bits = convert_tensor(tensor.qtype, tensor.data, tensor.shape,
                                          quantizable=quantizable)
        except (ValueError, NotImplementedError) as e:
            raise GGUFError(f"cannot convert tensor {name!r} ({tensor.qtype.name}): {e}") from None
        if is_norm and family.norm_offset:
            arrays["weight"] = arrays["weight"] - family.norm_offset
        if family.permute_qk and module.endswith((".q_proj", ".k_proj")):
            heads = config["num_attention_heads" if module.endswith(".q_proj")
                          else "num_key_value_heads"]
            arrays = {k: unpermute_rows(v, heads) for k, v in arrays.items()}
        parameters += math.prod(tensor.shape)
        if bits is None:
            out[new] = arrays["weight"]
        else:
            quantized[module] = bits
            out.update({f"{module}.{part}": arrays[part] for part in ("weight", "scales", "biases")})
    return out, quantized, parameters


def quantization_config(quantized: dict[str, int]) -> dict:
    """config.json "quantization": the most common bit width, plus per-module exceptions.

    llama.cpp mixes block types in one file (Q4_K_M keeps some layers at Q6_K).
    """
    from hippod.engine.gguf_tensors import GROUP_SIZE

    if not quantized:
        return {}
    common = Counter(quantized.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    for module, bits in sorted(quantized.items()):
        if bits != common:
            quant[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return {"quantization": quant, "quantization_config": quant}


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
    elif pre in ("llama-bpe", "llama3", "smaug-bpe", "qwen2"):
        pattern = QWEN2_PATTERN if pre == "qwen2" else LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
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
        description="Convert a GGUF file into an MLX model directory.")
    parser.add_argument("src", type=Path, help="GGUF file")
    parser.add_argument("dst", type=Path, help="output directory (must not exist or be empty)")
    args = parser.parse_args(argv)
    return lifeline.reply("gguf", lambda: convert_gguf(args.src, args.dst), (GGUFError,))


if __name__ == "__main__":
    sys.exit(main())
