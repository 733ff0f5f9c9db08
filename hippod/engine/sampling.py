"""Per-request samplers and logits processors, built from Ollama-style options.

A seeded request gets its own PRNG key so its output does not depend on what else shares the
batch; greedy requests share one sampler object so BatchGenerator samples them in one call.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_frequency_penalty,
    make_presence_penalty,
    make_repetition_penalty,
)

Sampler = Callable[[mx.array], mx.array]


def make_logits_shape(options: dict[str, Any]) -> Callable[[mx.array], mx.array] | None:
    """What a sampled request draws from: its log-probabilities cut by top-p, min-p and top-k,
    scaled by 1/temperature (None when greedy). Speculative decoding needs it apart from the
    draw, to compare the target's and the draft's distributions."""
    temp = float(options.get("temperature", 0.8))
    if temp <= 0:
        return None
    top_p = float(options.get("top_p", 1.0))
    top_k = int(options.get("top_k", 0) or 0)
    min_p = float(options.get("min_p", 0.0) or 0.0)

    def shape(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if 0 < top_k < logprobs.shape[-1]:  # k at or past the vocabulary keeps every token
            logprobs = apply_top_k(logprobs, top_k)
        return logprobs * (1 / temp)

    return shape


def request_key(options: dict[str, Any]):
    """The PRNG key of a seeded request; None for a random one. A negative seed means random,
    as llama.cpp's -1 does; one past 64 bits is taken modulo 2**64 (MLX's keys hold 64)."""
    seed = options.get("seed")
    if seed is None or int(seed) < 0:
        return None
    return mx.random.key(int(seed) % 2**64)


def make_request_sampler(options: dict[str, Any], drawn: int = 0) -> Sampler:
    """`drawn`: tokens this request already sampled elsewhere (a resumed request replays them).
    A seeded request's key is moved past them, so its continuation draws what the uncut run
    would have drawn: one split per token, as every decode path here calls its sampler once a
    token."""
    shape = make_logits_shape(options)
    if shape is None:
        return greedy_sampler
    seed_key = request_key(options)
    for i in range(drawn if seed_key is not None else 0):
        seed_key, _ = mx.random.split(seed_key)
        if i % 256 == 255:
            mx.eval(seed_key)  # a long replay must not become one deep lazy graph
    key = [seed_key] if seed_key is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        if key is None:
            return mx.random.categorical(shape(logprobs))
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(shape(logprobs), key=sub)

    return sample


def make_request_processors(options: dict[str, Any]) -> list:
    processors = []
    window = int(options.get("repeat_last_n", 64) or 64)
    if window < 0:
        window = 4096
    repeat = options.get("repeat_penalty")
    if repeat is not None and float(repeat) != 1.0 and float(repeat) > 0:
        processors.append(make_repetition_penalty(float(repeat), window))
    presence = options.get("presence_penalty")
    if presence:
        processors.append(make_presence_penalty(float(presence), window))
    frequency = options.get("frequency_penalty")
    if frequency:
        processors.append(make_frequency_penalty(float(frequency), window))
    return processors
