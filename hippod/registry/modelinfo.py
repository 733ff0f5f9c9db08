"""What a model directory holds, read from config.json and safetensors headers without loading.

Feeds both the records shown by /api/show and the memory guard's estimate.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelFormatError(ValueError):
    """The directory is not a model hippo can load; the message says what is wrong."""


@dataclass
class ModelInfo:
    family: str
    architecture: str
    parameters: int
    parameter_size: str
    quantization: str
    weights_bytes: int
    num_layers: int
    kv_heads: int
    head_dim: int
    context_length: int | None
    kv_dtype_bytes: int

    def as_details(self) -> dict:
        return asdict(self)


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelFormatError(f"{path.name}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ModelFormatError(f"{path.name}: not a safetensors file (header size {n})")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise ModelFormatError(f"{path.name}: not a safetensors file (bad header)") from None


CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "context_length")


def config_context_length(cfg: dict) -> int | None:
    """The context a config.json declares, under whichever name its family uses."""
    text = cfg.get("text_config", cfg)
    for key in CONTEXT_KEYS:
        if isinstance(text.get(key), int) and not isinstance(text.get(key), bool) and text[key] > 0:
            return text[key]
    return None


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(n)


def inspect_model_dir(path: Path) -> ModelInfo:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: no config.json (not a Hugging Face / MLX model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{cfg_path}: not valid JSON: {e}") from None
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelFormatError(f"{path}: no .safetensors weights")
    quant = cfg.get("quantization") or cfg.get("quantization_config") or {}
    bits = quant.get("bits")
    weights_bytes = params = 0
    dtypes: dict[str, int] = {}
    for shard in shards:
        for name, t in read_safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            start, end = t["data_offsets"]
            weights_bytes += end - start
            numel = 1
            for d in t["shape"]:
                numel *= d
            if name.endswith((".scales", ".biases")) and bits:
                continue
            if t["dtype"] == "U32" and bits:
                module = quant.get(name.rsplit(".", 1)[0])  # per-module override (mixed quants)
                module_bits = module.get("bits", bits) if isinstance(module, dict) else bits
                numel = numel * 32 // module_bits  # packed quantized weights
            params += numel
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + numel
    text = cfg.get("text_config", cfg)
    layers = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers") or 0
    heads = text.get("num_attention_heads") or text.get("n_head") or 1
    kv_heads = text.get("num_key_value_heads") or heads
    hidden = text.get("hidden_size") or text.get("n_embd") or 0
    head_dim = text.get("head_dim") or (hidden // heads if heads else 0)
    ctx = config_context_length(cfg)
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else "F16"
    if bits:
        quantization = cfg.get("gguf_quantization") or f"{bits}-bit"
    else:
        quantization = {"BF16": "BF16", "F16": "F16", "F32": "F32"}.get(main_dtype, main_dtype)
    float_dtype = "F32" if main_dtype == "F32" else "F16"
    return ModelInfo(
        family=str(cfg.get("model_type") or "unknown"),
        architecture=str((cfg.get("architectures") or [cfg.get("model_type") or "unknown"])[0]),
        parameters=params,
        parameter_size=human_count(params),
        quantization=quantization,
        weights_bytes=weights_bytes,
        num_layers=int(layers),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        context_length=int(ctx) if ctx else None,
        kv_dtype_bytes=_DTYPE_BYTES[float_dtype],
    )


# --------------------------------------------------------------------------- /api/show


def chat_template(path: Path) -> str:
    """The Jinja chat template the engine renders with ('' for a model without one)."""
    template = ""
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("chat_template") or ""
            template = value if isinstance(value, str) else json.dumps(value)
        except ValueError:
            pass
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return template


def capabilities(template: str) -> list[str]:
    """Ollama's capabilities, judged from the chat template like Ollama judges its template."""
    caps = ["completion"]
    if template:  # a template that ignores tools gets them in the system prompt (engine/tool_calls)
        caps.append("tools")
    if "enable_thinking" in template or "<think>" in template or "reasoning_content" in template:
        caps.append("thinking")
    return caps


# config.json key -> Ollama's model_info key (prefixed with the architecture).
_MODEL_INFO_KEYS = {
    "max_position_embeddings": "context_length", "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count", "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base", "vocab_size": "vocab_size",
    "sliding_window": "attention.sliding_window",
}


def ollama_model_info(path: Path, rec, verbose: bool = False) -> dict:
    """Ollama's model_info (GGUF-style keys) from config.json and the tokenizer files."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    text = cfg.get("text_config", cfg)
    arch = rec.family or str(cfg.get("model_type") or "unknown")
    info: dict = {"general.architecture": arch, "general.parameter_count": rec.parameters,
                  "general.basename": rec.name.split(":")[0]}
    if (file_type := (rec.details or {}).get("file_type")) is not None:
        info["general.file_type"] = file_type
    if quant := cfg.get("quantization"):
        info["general.quantization_version"] = 2
        info["hippo.quantization"] = {"bits": quant.get("bits"),
                                      "group_size": quant.get("group_size")}
    for key, name in _MODEL_INFO_KEYS.items():
        if text.get(key) is not None:
            info[f"{arch}.{name}"] = text[key]
    if rec.context_length and f"{arch}.context_length" not in info:
        info[f"{arch}.context_length"] = rec.context_length
    tokenizer = path / "tokenizer.json"
    if tokenizer.is_file():
        try:
            data = json.loads(tokenizer.read_text())
        except ValueError:
            data = {}
        model = data.get("model") or {}
        info["tokenizer.ggml.model"] = {"BPE": "gpt2" if model.get("byte_fallback") is False
                                        else "llama"}.get(model.get("type"), model.get("type"))
        if (pre := (rec.details or {}).get("tokenizer_pre")) is not None:
            info["tokenizer.ggml.pre"] = pre
        for key in ("tokens", "merges", "token_type"):  # Ollama empties the long arrays
            info[f"tokenizer.ggml.{key}"] = []
        if verbose:
            vocab = model.get("vocab") or {}
            tokens = sorted(vocab, key=vocab.get) if isinstance(vocab, dict) else \
                [v[0] for v in vocab]
            info["tokenizer.ggml.tokens"] = tokens
            info["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m)
                                             for m in model.get("merges") or []]
            control = {t.get("content") for t in data.get("added_tokens") or []
                       if t.get("special")}
            info["tokenizer.ggml.token_type"] = [3 if t in control else 1 for t in tokens]
    for name in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(name), int):
            info[f"tokenizer.ggml.{name}"] = cfg[name]
    return info


def tensor_list(path: Path) -> list[dict]:
    """Ollama's verbose `tensors`: name, type and shape of every stored tensor."""
    out = []
    for shard in sorted(path.glob("*.safetensors")):
        for name, t in read_safetensors_header(shard).items():
            if name != "__metadata__":
                out.append({"name": name, "type": t["dtype"], "shape": t["shape"]})
    return out
