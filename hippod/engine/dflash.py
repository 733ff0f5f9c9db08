"""DFlash drafts: a few transformer layers that draft a whole block of tokens in one forward.

A DFlash draft (arXiv 2602.06036; the z-lab checkpoint format: config.json with
`dflash_config.target_layer_ids`, `dflash_config.mask_token_id` and `block_size`; safetensors
with `fc`, `hidden_norm`, `norm` and `layers.N.*`) has no embeddings or head of its own. It
reads the target's hidden states after the chosen layers, fuses them (fc, then an RMS norm)
into one context row per token, and keeps each layer's keys and values of those rows in its KV
cache. To draft, it embeds [last token, mask, mask, ...] with the target's embeddings, runs the
block through its layers with attention over the context and the whole block (not causal),
and unembeds with the target's head: block_size - 1 guesses at once. The target verifies them
in one forward that also yields the hidden states of the tokens it keeps, which become context.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from hippod.engine.speculative import Decoding, decoder_of

ARCHITECTURES = {"DFlashDraftModel"}


class DFlashError(ValueError):
    pass


def is_dflash_dir(path: Path) -> bool:
    """A DFlash draft directory (as opposed to a model mlx_lm loads): detected by its config."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (bool(ARCHITECTURES & set(cfg.get("architectures") or []))
                                      or isinstance(cfg.get("dflash_config"), dict))


def spread_layers(num_target_layers: int, count: int) -> list[int]:
    """Target layers spread from shallow to deep, for a config that names none: the first after
    layer 1, the last before the final three."""
    if count == 1:
        return [num_target_layers // 2]
    lo, hi = 1, num_target_layers - 3
    return [lo + round(i * (hi - lo) / (count - 1)) for i in range(count)]


class DFlashConfig:
    def __init__(self, raw: dict):
        def need(key, where=raw):
            if key not in where:
                raise DFlashError(f"DFlash config.json has no {key!r}")
            return where[key]

        dc = raw.get("dflash_config") or {}
        self.hidden_size = int(need("hidden_size"))
        self.num_layers = int(need("num_hidden_layers"))
        self.num_heads = int(need("num_attention_heads"))
        self.num_kv_heads = int(raw.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(raw.get("head_dim") or self.hidden_size // self.num_heads)
        self.intermediate_size = int(need("intermediate_size"))
        self.eps = float(raw.get("rms_norm_eps", 1e-6))
        rope = raw.get("rope_parameters") or {}
        self.rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        self.rope_scaling = raw.get("rope_scaling")
        self.max_positions = raw.get("max_position_embeddings")
        self.bias = bool(raw.get("attention_bias", False))
        self.block_size = int(dc.get("block_size") or raw.get("block_size") or 0)
        if self.block_size < 2:
            raise DFlashError(f"DFlash block_size must be at least 2, not {self.block_size}")
        if dc.get("mask_token_id") is None:
            raise DFlashError("DFlash config.json has no dflash_config.mask_token_id")
        self.mask_token_id = int(dc["mask_token_id"])
        self.num_target_layers = raw.get("num_target_layers") or dc.get("num_target_layers")
        ids = dc.get("target_layer_ids")
        if ids is None:
            if not self.num_target_layers:
                raise DFlashError("DFlash config.json names no target_layer_ids")
            ids = spread_layers(int(self.num_target_layers), self.num_layers)
        self.target_layer_ids = tuple(int(i) for i in ids)
        if not self.target_layer_ids or any(b <= a for a, b in zip(self.target_layer_ids, self.target_layer_ids[1:])) \
                or self.target_layer_ids[0] < 0:
            raise DFlashError(f"DFlash target_layer_ids must ascend from 0 or more: {list(ids)}")
        kinds = set(raw.get("layer_types") or ["full_attention"])
        if kinds != {"full_attention"}:
            raise DFlashError(f"DFlash layer types {sorted(kinds)} are not supported (full_attention only)")


class _Attention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = d ** -0.5
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(d, eps=cfg.eps)
        self.k_norm = nn.RMSNorm(d, eps=cfg.eps)
        self.rope = initialize_rope(d, cfg.rope_theta, False, cfg.rope_scaling, cfg.max_positions)

    def _kv(self, x: mx.array, offset: int):
        B, L, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.num_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(k, offset=offset), v

    def add_context(self, hctx: mx.array, cache: KVCache) -> None:
        k, v = self._kv(hctx, cache.offset)
        cache.update_and_fetch(k, v)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.num_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)
        k, v = self._kv(x, offset)
        if offset:  # the block attends to the context and to itself; the cache keeps only context
            ck, cv = cache.keys_and_values()
            k, v = mx.concatenate([ck, k], axis=2), mx.concatenate([cv, v], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.eps)

    def __call__(self, x, cache):
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """The draft's weights, bound to the target whose embeddings and head it borrows."""

    kind = "dflash"

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.eps)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.eps)
        self.layers = [_Layer(cfg) for _ in range(cfg.num_layers)]

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def bind(self, target) -> None:
        _, decoder = decoder_of(target)
        self._embed = decoder.embed_tokens
        head = target.get("lm_head") if isinstance(target, dict) else None
        self._head = head if head is not None else decoder.embed_tokens.as_linear

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    def proposer(self, cache: list) -> "DFlashProposer":
        return DFlashProposer(self, cache)

    def add_context(self, features: mx.array, cache: list) -> None:
        hctx = self.hidden_norm(self.fc(features.astype(self.fc.weight.dtype)))
        for layer, c in zip(self.layers, cache):
            layer.self_attn.add_context(hctx, c)

    def block_logits(self, pending: int, n: int, cache: list) -> mx.array:
        """Logits of the n tokens after `pending` ([n, V]), in one forward."""
        ids = mx.array([[pending] + [self.cfg.mask_token_id] * n], mx.uint32)
        h = self._embed(ids)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self._head(self.norm(h[:, 1:]))[0]


class DFlashProposer:
    """One stream's DFlash state: the context rows of every token the target has kept."""

    def __init__(self, draft: DFlashDraft, cache: list):
        self.draft, self.cache = draft, cache
        self.taps = draft.cfg.target_layer_ids

    def prefill(self, tokens: list[int], features) -> None:
        self.draft.add_context(features, self.cache)

    def propose(self, pending: int, n: int, history: list[int], decoding: Decoding):
        n = min(n, self.draft.block_size - 1)
        return decoding.draw(history, None, self.draft.block_logits(pending, n, self.cache))

    def commit(self, drafts: list[int], accepted: int, features) -> None:
        self.draft.add_context(features, self.cache)


def _weights(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DFlashError(f"no .safetensors files in DFlash draft {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    out = {}
    for name, w in weights.items():
        for prefix in ("model.", "draft."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = w
    return out


def load_dflash(path: Path, target) -> DFlashDraft:
    """Load a DFlash draft directory for `target`; a draft that does not fit it is refused."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DFlashError(f"cannot read DFlash config {path / 'config.json'}: {e}") from None
    cfg = DFlashConfig(raw)
    _, decoder = decoder_of(target)
    n_target = len(decoder.layers)
    if cfg.num_target_layers and int(cfg.num_target_layers) != n_target:
        raise DFlashError(f"this DFlash draft was trained for {cfg.num_target_layers} target layers; "
                          f"the target has {n_target}")
    if cfg.target_layer_ids[-1] >= n_target:
        raise DFlashError(f"DFlash target layer {cfg.target_layer_ids[-1]} is out of range for "
                          f"{n_target} target layers")
    vocab, width = decoder.embed_tokens.weight.shape[0], _embed_width(decoder.embed_tokens)
    if width != cfg.hidden_size:
        raise DFlashError(f"this DFlash draft has hidden size {cfg.hidden_size}; the target {width}")
    if not 0 <= cfg.mask_token_id < vocab:
        raise DFlashError(f"DFlash mask token {cfg.mask_token_id} is outside the target's "
                          f"{vocab}-token vocabulary")
    draft = DFlashDraft(cfg)
    weights = _weights(path)
    wanted = {name for name, _ in tree_flatten(draft.parameters())}
    missing = sorted(wanted - set(weights))
    if missing:
        raise DFlashError(f"DFlash draft {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    # Checkpoints may carry what the draft borrows from its target (embeddings, head): not ours.
    try:
        draft.load_weights([(k, v) for k, v in weights.items() if k in wanted], strict=True)
    except ValueError as e:
        raise DFlashError(f"DFlash draft {path}: {e}") from None
    mx.eval(draft.parameters())
    draft.bind(target)
    return draft


def _embed_width(embed) -> int:
    """The hidden size of a (possibly quantized) embedding table."""
    return int(embed(mx.array([[0]])).shape[-1])
