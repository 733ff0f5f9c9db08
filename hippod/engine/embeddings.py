"""Sentence embeddings from a causal LM: mean-pooled, L2-normalised last hidden states.

This is what Ollama and LM Studio return for a chat model asked for embeddings; dedicated
embedding models pool the same way.
"""

from __future__ import annotations

import mlx.core as mx


def _backbone(model):
    """The decoder stack that returns hidden states (before the LM head) for mlx_lm models."""
    for path in (("model",), ("language_model", "model"), ("backbone",)):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and callable(obj):
            return obj
    raise ValueError("this model family does not expose hidden states for embeddings")


def embed_texts(model, tokenizer, texts: list[str], *, max_tokens: int, truncate: bool
                ) -> tuple[list[list[float]], int]:
    backbone = _backbone(model)
    vectors, total = [], 0
    for text in texts:
        tokens = tokenizer.encode(text)
        if not tokens:
            raise ValueError("cannot embed an empty input")
        if len(tokens) > max_tokens:
            if not truncate:
                raise ValueError(f"input length {len(tokens)} exceeds the context length {max_tokens}")
            tokens = tokens[:max_tokens]
        hidden = backbone(mx.array(tokens)[None])
        pooled = hidden[0].astype(mx.float32).mean(axis=0)
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
        vectors.append(pooled.tolist())
        total += len(tokens)
    return vectors, total
