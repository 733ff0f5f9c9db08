"""Per-token log probabilities, read off the distribution the runner sampled from.

mlx_lm hands every decoding path (generate_step, speculative_generate_step, BatchGenerator) the
log-softmax of the logits *after* the logits processors: repetition penalties and, for structured
output or forced tool calls, the grammar mask. So these are the logprobs of the constrained
distribution (a token the grammar forbids never shows up among the alternatives), before
temperature, top-k, top-p and min-p, which only decide how that distribution is sampled. That is
what OpenAI reports too (its logprobs do not change with temperature).

Entries have the shape both APIs send: {"token", "logprob", "bytes", "top_logprobs": [...]}.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
from mlx_lm.tokenizer_utils import _byte_decoder

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Each token id's bytes, as the model wrote them (byte-level BPE or SentencePiece)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}
        self._decoder = _byte_decoder()

    def bytes_of(self, token: int) -> bytes:
        got = self._bytes.get(token)
        if got is None:
            got = self._bytes[token] = self._compute(token)
        return got

    def _compute(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return self.tokenizer.decode([token]).encode()
        if m := _HEX_BYTE.fullmatch(piece):  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        if piece and all(c in self._decoder for c in piece):  # byte-level BPE (GPT-2 style)
            return bytes(self._decoder[c] for c in piece)
        return piece.replace("\u2581", " ").encode()

    def entry(self, token: int, logprob: float) -> dict:
        raw = self.bytes_of(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}


def token_entry(texts: TokenTexts, logprobs: mx.array, token: int, top: int) -> dict:
    """The chosen token's entry with its `top` most likely alternatives (finite ones only)."""
    lp = logprobs.reshape(-1).astype(mx.float32)
    entry = texts.entry(token, _finite(lp[token].item()))
    alternatives = []
    if top > 0:
        k = min(top, lp.shape[0])
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx]
        order = mx.argsort(-vals)
        for i, v in zip(idx[order].tolist(), vals[order].tolist()):
            if math.isfinite(v):
                alternatives.append(texts.entry(int(i), v))
    entry["top_logprobs"] = alternatives
    return entry


def _finite(v: float) -> float:
    """JSON has no -inf: a token the distribution forbade (it was forced) reports a floor."""
    return v if math.isfinite(v) else -9999.0
