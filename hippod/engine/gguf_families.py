"""Per-architecture facts for importing GGUF files into mlx_lm models.

Each family names its mlx_lm model type, maps llama.cpp's tensor names (gguf.constants
TENSOR_NAMES) to mlx_lm's, and says which of llama.cpp's conversion-time changes to undo:
the rotary row permutation of Q and K (llama, mistral) and the `1 +` folded into Gemma's RMS
norm weights (mlx_lm's Gemma norms add the 1 themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GEMMA_LAYER = {
    **LLAMA_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_LAYER = {
    **LLAMA_LAYER,
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the Hugging Face class name config.json carries
    layer_names: dict[str, str]
    permute_qk: bool = False
    norm_offset: float = 0.0
    # Tensors folded into config.json rather than kept as weights.
    config_tensors: tuple[str, ...] = ()
    # (metadata lookup, config so far, raw tensors) -> more config.json keys
    extra_config: Callable[[Callable, dict, dict], dict] = field(default=lambda key, c, w: {})

    def hf_name(self, gguf_name: str) -> str | None:
        """GGUF tensor name -> mlx_lm name (suffix kept); None if this family has no such tensor."""
        base, _, suffix = gguf_name.rpartition(".")
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            if parts[2] in self.layer_names:
                return f"model.layers.{parts[1]}.{self.layer_names[parts[2]]}.{suffix}"
            return None
        if base in GLOBAL:
            return f"{GLOBAL[base]}.{suffix}"
        return None


def _gemma2(key, config, weights) -> dict:
    head_dim = config["head_dim"]
    return {
        "attn_logit_softcapping": float(key("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(key("final_logit_softcapping", 30.0)),
        "query_pre_attn_scalar": int(head_dim),
        "sliding_window": int(key("attention.sliding_window", 4096)),
    }


def _gemma3(key, config, weights) -> dict:
    extra = {
        "query_pre_attn_scalar": int(config["head_dim"]),
        "sliding_window": int(key("attention.sliding_window", 512)),
        "sliding_window_pattern": 6,  # fixed for Gemma 3, as llama.cpp assumes
        "rope_local_base_freq": 10000.0,
    }
    if key("rope.scaling.type", "none") == "linear":
        extra["rope_scaling"] = {"rope_type": "linear",
                                 "factor": float(key("rope.scaling.factor", 1.0))}
    return extra


def _phi3(key, config, weights) -> dict:
    rotary = int(key("rope.dimension_count", config["head_dim"]))
    extra = {"partial_rotary_factor": rotary / config["head_dim"]}
    original = key("rope.scaling.original_context_length", None)
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    if "rope_factors_long.weight" in weights:
        extra["rope_scaling"] = {
            "type": "longrope",
            "long_factor": weights["rope_factors_long.weight"].floats().tolist(),
            "short_factor": weights["rope_factors_short.weight"].floats().tolist(),
        }
    return extra


_LLAMA = Family("llama", "LlamaForCausalLM", LLAMA_LAYER, permute_qk=True,
                config_tensors=("rope_freqs.weight",))
FAMILIES = {
    "llama": _LLAMA,
    # llama.cpp writes Mistral 7B-style models as "llama"; some tools write "mistral".
    "mistral": _LLAMA,
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", LLAMA_LAYER),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", LLAMA_LAYER),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", GEMMA_LAYER, norm_offset=1.0,
                     extra_config=_gemma2),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", GEMMA_LAYER, norm_offset=1.0,
                     extra_config=_gemma3),
    "phi3": Family("phi3", "Phi3ForCausalLM", PHI3_LAYER, extra_config=_phi3,
                   config_tensors=("rope_factors_long.weight", "rope_factors_short.weight")),
}
