"""Draft models for speculative decoding: a separate small model, or the target's own first layers.

The self-draft shares every weight with the target (embeddings, the first k blocks, final norm
and head), so it costs no memory; it is the early-exit trick of the MLX Speculative Server seed.
Acceptance is lower than a trained draft's, and greedy output never changes either way, because
the target verifies every drafted token.
"""

from __future__ import annotations

import copy

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from hippod.engine.speculative import PREFILL_STEP, Decoding, decoder_of


def self_draft(model, num_layers: int):
    """A shallow copy of `model` that runs only its first `num_layers` blocks."""
    path, decoder = decoder_of(model)
    if not 0 < num_layers < len(decoder.layers):
        raise ValueError(f"self-draft needs 1..{len(decoder.layers) - 1} layers, not {num_layers}")
    short = copy.copy(decoder)
    short.layers = decoder.layers[:num_layers]
    draft = copy.copy(model)
    if len(path) == 1:
        draft.model = short
    else:
        lm = copy.copy(getattr(model, path[0]))
        lm.model = short
        setattr(draft, path[0], lm)
    return draft


class ModelDrafter:
    """Drafts with an autoregressive model of the target's tokenizer, one forward per token."""

    kind = "model"

    def __init__(self, model):
        self.model = model

    def make_cache(self) -> list:
        return make_prompt_cache(self.model)

    def proposer(self, cache: list) -> "ModelProposer":
        return ModelProposer(self.model, cache)


class ModelProposer:
    """A draft model's side of one stream. Its cache follows the target's, except after a round
    whose every draft was kept: the last draft was never fed to it, so it goes in first next
    round (`behind`), the way mlx_lm's speculative_generate_step does it; and after plain rounds
    (the policy drafted nothing), whose tokens it reads from `history` when it drafts again."""

    taps: tuple[int, ...] = ()

    def __init__(self, model, cache: list):
        self.model, self.cache = model, cache
        self.behind: list[int] = []

    def prefill(self, tokens: list[int], features) -> None:
        tokens = self.behind + list(tokens)
        self.behind = []
        for start in range(0, len(tokens), PREFILL_STEP):
            self.model(mx.array(tokens[start:start + PREFILL_STEP], mx.uint32)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])

    def propose(self, pending: int, n: int, history: list[int], decoding: Decoding):
        missed = history[self.cache[0].offset + len(self.behind):-1] if history else []
        if missed:
            self.prefill(missed, None)
        feed = mx.array(self.behind + [pending], mx.uint32)
        self.behind = []
        drafts, probs = [], []
        for _ in range(n):
            logits = self.model(feed[None], cache=self.cache)[0, -1:]
            feed, p = decoding.draw(history, mx.concatenate(drafts) if drafts else None, logits)
            mx.async_eval(feed)
            drafts.append(feed)
            if p is not None:
                probs.append(p)
        return mx.concatenate(drafts), (mx.concatenate(probs, axis=0) if probs else None)

    def commit(self, drafts: list[int], accepted: int, features) -> None:
        # The draft fed itself pending and drafts[:-1]; the target keeps pending, drafts[:accepted].
        extra = (len(drafts) - 1) - accepted
        if extra > 0:
            for c in self.cache:
                c.trim(extra)
        elif accepted == len(drafts) and drafts:
            self.behind = [drafts[-1]]


def load_drafter(target, draft_dir=None, self_draft_layers: int = 0):
    """The drafter a runner speculates with: a DFlash draft directory, a draft model's
    directory, the target's own first layers, or None."""
    if draft_dir is not None:
        from hippod.engine.dflash import is_dflash_dir, load_dflash

        if is_dflash_dir(draft_dir):
            return load_dflash(draft_dir, target)
        from mlx_lm import load

        model, _ = load(str(draft_dir))
        mx.eval(model.parameters())
        return ModelDrafter(model)
    if self_draft_layers > 0:
        return ModelDrafter(self_draft(target, self_draft_layers))
    return None


def damp_layers(model, start: int, epsilon: float) -> None:
    """Scale what layers start.. add to the residual stream by `epsilon`, in place: as epsilon
    goes to 0 the target tends to its own first `start` layers, so a self-draft of that depth
    agrees with it at a rate epsilon dials. Benchmarks and tests use it to measure speculation
    at known acceptance without a trained draft (a random draft agrees with nothing)."""
    _, decoder = decoder_of(model)
    for layer in decoder.layers[start:]:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            # A quantized weight dequantizes as scales * q + biases: scaling both scales it.
            for name in ("weight", "scales", "biases", "bias"):
                if name in proj and not (name == "weight" and "scales" in proj):
                    proj[name] = proj[name] * epsilon
    mx.eval(model.parameters())
