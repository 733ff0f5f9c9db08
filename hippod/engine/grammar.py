"""Structured output: a JSON-schema grammar enforced token by token, as an mlx_lm logits processor.

llguidance (Rust, no heavy dependencies) turns a JSON schema into a matcher that, for the text so
far, says which tokens may come next. Each request gets a fresh matcher; the compiled grammar is
kept in a small LRU per tokenizer, so a schema that repeats costs a matcher copy, not a compile.
Tokens the grammar forbids get -inf, so sampling (greedy or not) can only continue valid JSON, and
once the value is complete only end-of-sequence is allowed, which stops generation.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import llguidance
import mlx.core as mx
import numpy as np

from hippod.engine.prompts import PromptError

log = logging.getLogger("hippo.runner")

# Whitespace between JSON tokens: none, one space, or one newline with indentation (as llama.cpp's
# JSON grammars allow). Unbounded whitespace lets a weak model fill its whole budget with blanks.
WHITESPACE = r"(?: |\n[ \t]{0,16})?"
CACHE_SIZE = 32


class GrammarError(PromptError):
    """The grammar request is invalid or uses what llguidance cannot enforce (an HTTP 400)."""


def canonical(grammar: dict) -> str:
    return json.dumps(grammar, sort_keys=True, separators=(",", ":"))


def grammar_source(grammar: dict) -> str:
    """The llguidance grammar for a runner grammar request: {"json_schema": S} or {"json_object": true}."""
    if not isinstance(grammar, dict):
        raise GrammarError("grammar must be an object")
    if "json_schema" in grammar:
        schema = grammar["json_schema"]
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
    elif grammar.get("json_object"):
        schema = {"type": "object"}
    else:
        raise GrammarError(f"unknown grammar request: {sorted(grammar)}")
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_pattern": WHITESPACE})
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source)
    if is_error:
        raise GrammarError(f"unsupported JSON schema: {messages[0] if messages else 'invalid'}")
    return source


class GrammarCompiler:
    """One tokenizer's llguidance view plus compiled grammars, most recently used kept."""

    def __init__(self, tokenizer, cache_size: int = CACHE_SIZE):
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("structured output needs a fast (tokenizers) tokenizer")
        self.eos_ids = sorted(int(t) for t in tokenizer.eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=self.eos_ids)
        self.vocab_size = self.tokenizer.vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: dict) -> llguidance.LLMatcher:
        key = canonical(grammar)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto.deep_copy()
        proto = llguidance.LLMatcher(self.tokenizer, grammar_source(grammar), log_level=0)
        if proto.is_error():
            raise GrammarError(f"unsupported JSON schema: {proto.get_error()}")
        with self._lock:
            self._cache[key] = proto
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return proto.deep_copy()

    def processor(self, grammar: dict) -> "GrammarProcessor":
        return GrammarProcessor(self.matcher(grammar), self.vocab_size, self.eos_ids)


_compilers: dict[int, tuple[object, GrammarCompiler]] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer) -> GrammarCompiler:
    """The tokenizer's compiler, built on first use (about 0.4 s for a 49k vocabulary)."""
    with _compilers_lock:
        entry = _compilers.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, GrammarCompiler(tokenizer))
            _compilers[id(tokenizer)] = entry
        return entry[1]


def make_grammar_processor(tokenizer, grammar: dict) -> "GrammarProcessor":
    return compiler_for(tokenizer).processor(grammar)


class GrammarProcessor:
    """A per-sequence logits processor: `(tokens_so_far, logits[1, vocab]) -> masked logits`.

    generate_step and BatchGenerator call it once per step for its sequence. The first call sees
    the prompt, each later call sees exactly one new token at the end (the one sampled last step),
    which is fed to the matcher before the next mask is computed. A sequence moved from one
    generator to another is shown its last token again: `expect_repeat()` says so beforehand.
    Speculative decoding (draft tokens, then rollback) is not supported: it must not be used.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.started = False
        self.failed = False
        self.repeat = False
        self.last_token: int | None = None
        self.bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self._consume(int(tokens[-1].item()))
        self.started = True
        mx.async_eval(logits)  # the forward pass runs while the mask is computed on the CPU
        allowed = self.allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def expect_repeat(self) -> None:
        """The next call shows the last consumed token again (the sequence changed generators)."""
        self.repeat = True

    def advance(self, token: int) -> None:
        """Feed a token the sequence already holds (a resumed request's replay)."""
        self._consume(token)

    def _consume(self, token: int) -> None:
        if self.repeat:
            self.repeat = False
            if token == self.last_token:
                return
            log.warning("grammar resync: expected token %s again, got %d", self.last_token, token)
        self.last_token = token
        if self.failed or token in self.eos_ids:  # nothing follows an end of sequence
            return
        if not self.matcher.consume_token(token):
            self.failed = True
            log.warning("grammar rejected token %d: %s", token, self.matcher.get_error())

    def allowed(self, width: int) -> np.ndarray:
        """Boolean mask over `width` logits; ids past the tokenizer's vocabulary are never allowed."""
        if self.failed or self.matcher.is_error():
            mask = np.zeros(width, dtype=bool)
            mask[[t for t in self.eos_ids if t < width]] = True
            return mask
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").view(bool)
        if width <= bits.size:
            return bits[:width]
        return np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])

    @property
    def done(self) -> bool:
        """True once the grammar is complete (only end-of-sequence may follow)."""
        return self.matcher.is_stopped()
