"""Draft models for speculative decoding: a separate small model, or the target's own first layers.

The self-draft shares every weight with the target (embeddings, the first k blocks, final norm
and head), so it costs no memory; it is the early-exit trick of the MLX Speculative Server seed.
Acceptance is lower than a trained draft's, and greedy output never changes either way, because
the target verifies every drafted token.
"""

from __future__ import annotations

import copy


def _decoder(model):
    for path in (("model",), ("language_model", "model")):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and isinstance(getattr(obj, "layers", None), list):
            return path, obj
    raise ValueError("this model family has no layer list to draft from")


def self_draft(model, num_layers: int):
    """A shallow copy of `model` that runs only its first `num_layers` blocks."""
    path, decoder = _decoder(model)
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
