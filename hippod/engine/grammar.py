"""Structured output: a JSON-schema grammar enforced token by token, as an mlx_lm logits processor.

llguidance (Rust, no heavy dependencies) turns a JSON schema into a matcher that, for the text so
far, says which tokens may come next. Each request gets a fresh matcher; the compiled grammar is
kept in a small LRU per tokenizer, so a schema that repeats costs a matcher copy, not a compile.
Tokens the grammar forbids get -inf, so sampling (greedy or not) can only continue valid JSON, and
once the value is complete only end-of-sequence is allowed, which stops generation.

Every schema is compiled through `grammar_source`, which first closes its objects the way Ollama
does (llama.cpp's schema-to-grammar): clients such as pydantic's `model_json_schema()` never set
`additionalProperties`, and read literally JSON Schema would then let a model invent keys forever.
This module imports no mlx at load time, so the daemon can check schemas with the same code.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np

from hippod.engine.prompts import PromptError

log = logging.getLogger("hippo.runner")

# Whitespace between JSON tokens: none, one space, or one newline with up to 16 spaces or tabs
# (llama.cpp's grammars, which Ollama uses, allow up to 20, and two newlines). Nothing before the
# value or after it. Unbounded whitespace lets a weak model fill its whole budget with blanks.
WHITESPACE = r"(?: |\n[ \t]{0,16})?"
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 32

# Where subschemas sit that closing reaches: one subschema, a list of them, a map of names to them.
# `not`, `if`/`then`/`else` and `dependentSchemas` are left alone: closing a negation or a
# condition would change what it means (and llama.cpp's schema-to-grammar ignores them too).
_ONE = ("additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
        "items", "contains")
_LIST = ("prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions")
_APPLICATORS = ("allOf", "anyOf", "oneOf")
_OPEN_KEYS = ("additionalProperties", "unevaluatedProperties")  # the schema decided itself


class GrammarError(PromptError):
    """The grammar request is invalid or uses what llguidance cannot enforce (an HTTP 400)."""


def canonical(grammar: dict) -> str:
    return json.dumps(grammar, sort_keys=True, separators=(",", ":"))


# -- closing objects ------------------------------------------------------------------------------


def close_objects(schema: Any) -> Any:
    """The schema with every object closed to its declared properties, at any depth (a copy).

    Ollama's rule: an object schema that has `properties` (or `patternProperties`) and does not
    set `additionalProperties` allows only those keys (and the ones `required` names); an
    explicit `true` or a schema is kept, and `{"type": "object"}` alone stays any object. Keys
    declared through `allOf`/`anyOf`/`oneOf` count on both sides: the parent allows its members'
    keys and each member the parent's (in `allOf` its siblings' too), as llama.cpp merges them,
    so closing never makes a combination unsatisfiable.
    """
    return _close(copy.deepcopy(schema), frozenset(), _local_defs(schema))


def _pointer(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _local_defs(node: Any, path: str = "#") -> dict[str, Any]:
    """Every `$defs`/`definitions` entry, at any depth, by the local reference that names it."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}/{_pointer(key)}"
            if key in ("$defs", "definitions") and isinstance(value, dict):
                out.update({f"{here}/{_pointer(n)}": s for n, s in value.items()})
            out.update(_local_defs(value, here))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.update(_local_defs(value, f"{path}/{i}"))
    return out


def _own_keys(schema: dict) -> set[str]:
    names = set(schema["properties"]) if isinstance(schema.get("properties"), dict) else set()
    required = schema.get("required")
    if isinstance(required, list):
        names |= {r for r in required if isinstance(r, str)}
    return names


def _declared(schema: Any, defs: dict[str, Any], seen: frozenset = frozenset()) -> set[str]:
    """The keys a schema names for its object: its own, its applicators' and its reference's."""
    if not isinstance(schema, dict):
        return set()
    names = _own_keys(schema)
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref in defs and ref not in seen:
        names |= _declared(defs[ref], defs, seen | {ref})
    for key in _APPLICATORS:
        for member in schema.get(key) if isinstance(schema.get(key), list) else []:
            names |= _declared(member, defs, seen)
    return names


def _may_be_object(schema: dict) -> bool:
    kind = schema.get("type")
    return kind is None or kind == "object" or (isinstance(kind, list) and "object" in kind)


def _close(schema: Any, around: frozenset, defs: dict[str, Any],
           inlined: frozenset = frozenset()) -> Any:
    """Close `schema` in place; `around` are keys the schemas it is combined with declare."""
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if around and isinstance(ref, str) and ref in defs and ref not in inlined \
            and not around <= _declared(defs[ref], defs):
        # The definition must also allow keys declared around this use: inline a copy here.
        target = copy.deepcopy(defs[ref])
        if isinstance(target, dict):
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
            inlined |= {ref}
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            schema[key] = {n: _close(s, frozenset(), defs) for n, s in schema[key].items()}
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            schema[key] = _close(schema[key], frozenset(), defs)
    for key in _LIST:
        if isinstance(schema.get(key), list):
            schema[key] = [_close(s, frozenset(), defs) for s in schema[key]]
    own = frozenset(_own_keys(schema))
    for key in _APPLICATORS:
        members = schema.get(key)
        if not isinstance(members, list):
            continue
        siblings = frozenset().union(*(_declared(m, defs) for m in members)) \
            if key == "allOf" else frozenset()
        schema[key] = [_close(m, around | own | siblings, defs, inlined) for m in members]
    if "$ref" in schema or not _may_be_object(schema) or any(k in schema for k in _OPEN_KEYS):
        return schema  # a reference is closed where its definition lives
    if not isinstance(schema.get("properties", {}), dict):
        return schema  # malformed: left for the compiler to refuse
    if not around and "properties" not in schema and "patternProperties" not in schema:
        return schema  # {"type": "object"} or only applicators: the members decide, as in Ollama
    if any(_explicitly_open(m, defs) for k in _APPLICATORS for m in schema.get(k) or []):
        return schema  # a member allows any key: closing here would take that back
    props = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
    names = _declared(schema, defs) | around
    missing = {n: {} for n in sorted(names - set(props))}  # declared elsewhere: that schema rules
    schema["properties"] = {**props, **missing}
    schema["additionalProperties"] = False
    return schema


def _explicitly_open(member: Any, defs: dict[str, Any]) -> bool:
    if isinstance(member, dict) and isinstance(member.get("$ref"), str):
        member = defs.get(member["$ref"], member)
    return isinstance(member, dict) and any(
        k in member and member[k] is not False for k in _OPEN_KEYS)


# -- compiling ----------------------------------------------------------------------------------


def grammar_source(grammar: dict) -> str:
    """The llguidance grammar for a grammar request: {"json_schema": S} or {"json_object": true}.

    The one way a schema becomes a grammar, in the runner and in the daemon's request checks,
    whichever API it came from: objects closed, whitespace bounded, unsupported schemas refused.
    With "compact": true (a required tool call, which no one reads as text) the JSON is written
    on one line with ", " and ": " between tokens: about half the tokens of indented JSON.
    """
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
    layout = COMPACT if grammar.get("compact") else {"whitespace_pattern": WHITESPACE}
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(close_objects(schema)), overrides=layout)
    except RecursionError:
        raise GrammarError("the JSON schema is nested too deeply") from None
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

    def __call__(self, tokens, logits):
        import mlx.core as mx  # here, not at the top: the daemon imports this module too

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
