"""Speculative decoding: a drafter proposes tokens, the target checks them all in one forward.

One loop serves every kind of draft: a small model of the same tokenizer, the target's own
first layers, a DFlash block drafter fed the target's hidden states, and the benchmark's oracle.
The target verifies every drafted token, so output is lossless: greedy output is the plain
greedy output, and sampled output follows the target's distribution (rejection sampling,
Leviathan et al. 2023). Caches are rolled back before any token of a round is handed out, so
a consumer may stop at any token and find the target's cache holding the tokens it has seen
(plus at most the rest of that round, which `trim_to` removes).

A proposer is a small stateful object over its own KV caches:
  - `taps`: the target layers whose outputs it reads (DFlash), else ();
  - `prefill(tokens, features)`: take in context the target has processed;
  - `propose(pending, n, history, decoding)`: up to n draft tokens after `pending` (the last
    token of `history`, which the target has not processed yet), drawn with `decoding.draw`
    and left lazy (an mx.array: the target's verify is queued behind them without a wait),
    and the probabilities they were drawn from (None when greedy, or deterministic drafts);
  - `commit(drafts, accepted, features)`: the target kept `accepted` of the drafts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from hippod.engine.draft_policy import ema

PREFILL_STEP = 512
PHASES = ("draft", "verify", "accept", "trim")


class Proposer(Protocol):
    taps: tuple[int, ...]

    def prefill(self, tokens: list[int], features: mx.array | None) -> None: ...

    def propose(self, pending: int, n: int, history: list[int], decoding: "Decoding"
                ) -> tuple[mx.array, mx.array | None]: ...

    def commit(self, drafts: list[int], accepted: int, features: mx.array | None) -> None: ...


@dataclass
class Stats:
    """What a speculative stream did; `seconds` per phase is filled when profiling."""
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


# -- the target's forward, with its hidden states tapped ---------------------------------------


def decoder_of(model):
    """The module that holds the layer list (a text model, or the language part of a VLM)."""
    for path in (("model",), ("language_model", "model")):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and isinstance(getattr(obj, "layers", None), list):
            return path, obj
    raise ValueError("this model family has no layer list to draft from")


class _Tap:
    """Stands in for one layer during a forward and keeps its output."""

    def __init__(self, layer, store: dict, index: int):
        self._layer, self._store, self._index = layer, store, index

    def __call__(self, *args, **kwargs):
        out = self._layer(*args, **kwargs)
        self._store[self._index] = out
        return out

    def __getattr__(self, name):  # families read flags off their layers (use_sliding, ...)
        return getattr(self._layer, name)


def forward(model, tokens: mx.array, cache: list, taps: tuple[int, ...] = ()):
    """The target's logits for `tokens` ([L]) and, when taps are asked, the concatenated
    outputs of those layers ([1, L, H * len(taps)]). Tapping swaps the layer list for one
    call, so it works with any family that iterates its layers."""
    if not taps:
        return model(tokens[None], cache=cache), None
    _, decoder = decoder_of(model)
    layers, store = decoder.layers, {}
    tapped = list(layers)
    for i in taps:
        tapped[i] = _Tap(layers[i], store, i)
    decoder.layers = tapped
    try:
        logits = model(tokens[None], cache=cache)
    finally:
        decoder.layers = layers
    return logits, mx.concatenate([store[i] for i in taps], axis=-1)


def prefill(model, proposer: Proposer, cache: list, tokens: list[int]) -> None:
    """Bring the target's and the proposer's caches over `tokens`, in chunks."""
    for start in range(0, len(tokens), PREFILL_STEP):
        chunk = tokens[start:start + PREFILL_STEP]
        _, features = forward(model, mx.array(chunk, mx.uint32), cache, proposer.taps)
        if features is not None:
            mx.eval(features)
        else:
            mx.eval([c.state for c in cache])
        proposer.prefill(chunk, features)
        mx.clear_cache()


# -- acceptance --------------------------------------------------------------------------------


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """How many drafts agree with the target's own choices, from the first on."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


def accept_sampled(drafts: list[int], p: mx.array, q: mx.array | None, key=None) -> tuple[int, int]:
    """Rejection sampling: keep draft i with probability min(1, p_i(d)/q_i(d)); at the first
    rejection draw from norm(max(p_i - q_i, 0)), after the last acceptance from p_n. The kept
    tokens and the drawn one are distributed as the target's own samples would be.

    `p` is [n+1, V] (the target's probabilities at each drafted position and one past the
    last), `q` is [n, V] (the draft's), or None for a deterministic draft (q is one-hot).
    Returns (accepted, next token)."""
    n = len(drafts)
    k_accept, k_draw = mx.random.split(key) if key is not None else (None, None)
    ok = []
    if n:
        rows, idx = mx.arange(n), mx.array(drafts, mx.int32)
        p_d = p[:n][rows, idx]
        q_d = q[rows, idx] if q is not None else mx.ones((n,))
        u = mx.random.uniform(shape=(n,), key=k_accept)
        ok = (u * q_d <= p_d).tolist()  # u < p/q, without dividing by a zero q
    accepted = 0
    while accepted < n and ok[accepted]:
        accepted += 1
    if accepted == n:
        dist = p[n]
    else:
        q_row = q[accepted] if q is not None else mx.zeros_like(p[accepted]).at[drafts[accepted]].add(1.0)
        rest = mx.maximum(p[accepted] - q_row, 0.0)
        total = rest.sum()
        dist = mx.where(total > 0, rest / mx.maximum(total, 1e-30), p[accepted])
    token = mx.random.categorical(mx.log(mx.maximum(dist, 1e-38)), key=k_draw)
    return accepted, int(token)


# -- the loop ------------------------------------------------------------------------------------


@dataclass
class Decoding:
    """How a request picks tokens: `shape` turns log-probabilities into the logits it samples
    from (temperature, top-p/k, min-p), or None for greedy; `processors` are mlx_lm logits
    processors (repetition penalties); `key` a PRNG key for a seeded request. Draft and target
    go through the same one, which rejection sampling needs."""
    shape: Callable[[mx.array], mx.array] | None = None
    processors: list = field(default_factory=list)
    key: object = None

    @property
    def greedy(self) -> bool:
        return self.shape is None

    def next_key(self):
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def _shaped(self, rows: mx.array) -> mx.array:
        return self.shape(rows - mx.logsumexp(rows, axis=-1, keepdims=True))

    def process(self, history: mx.array, rows: mx.array) -> mx.array:
        """Row i of `rows` ([n, V]) is the next-token logits after history[:len - n + 1 + i]:
        processors see the tokens before each row, as mlx_lm's generate_step shows them."""
        if not self.processors:
            return rows
        out = []
        for i in range(rows.shape[0]):
            row = rows[i:i + 1]
            hist = history[:history.shape[0] - rows.shape[0] + 1 + i]
            for proc in self.processors:
                row = proc(hist, row)
            out.append(row)
        return mx.concatenate(out, axis=0)

    def target(self, history: list[int], drafts: mx.array | None, rows: mx.array) -> mx.array:
        """The target's choices (greedy) or probabilities (sampled) at each verified row."""
        if self.processors:
            rows = self.process(_joined(history, drafts), rows)
        if self.greedy:
            return mx.argmax(rows, axis=-1)
        return mx.softmax(self._shaped(rows), axis=-1)

    def draw(self, history: list[int], drafted: mx.array | None, rows: mx.array
             ) -> tuple[mx.array, mx.array | None]:
        """Draft tokens ([n], left lazy) from `rows` ([n, V]; row i follows history, then the
        tokens `drafted` before this call, then those drawn before it) and, when sampling, the
        probabilities they were drawn from."""
        if not self.processors:
            return self._draw_rows(rows)
        tokens, probs = [], []
        for i in range(rows.shape[0]):
            seen = _joined(history, mx.concatenate([x for x in (drafted, *tokens) if x is not None])
                           if drafted is not None or tokens else None)
            drawn, p = self._draw_rows(self.process(seen, rows[i:i + 1]))
            tokens.append(drawn)
            probs.append(p)
        return mx.concatenate(tokens), None if self.greedy else mx.concatenate(probs, axis=0)

    def _draw_rows(self, rows: mx.array) -> tuple[mx.array, mx.array | None]:
        if self.greedy:
            return mx.argmax(rows, axis=-1).astype(mx.uint32), None
        shaped = self._shaped(rows)
        key = self.next_key()
        drawn = mx.random.categorical(shaped, key=key) if key is not None else mx.random.categorical(shaped)
        return drawn.astype(mx.uint32), mx.softmax(shaped, axis=-1)


def _joined(history: list[int], drafts: mx.array | None) -> mx.array:
    head = mx.array(history, mx.uint32)
    return head if drafts is None else mx.concatenate([head, drafts.astype(mx.uint32)])


def speculative_stream(model, proposer: Proposer, cache: list, tokens: list[int], *,
                       max_tokens: int, num_draft: Callable[[], int] | int, decoding: Decoding,
                       stats: Stats | None = None, profile: bool = False,
                       on_round: Callable[[int, int, float], None] | None = None
                       ) -> Iterator[tuple[int, bool]]:
    """Yield (token, drafted) pairs. `tokens` is the whole sequence so far; `cache` (the
    target's) and the proposer's caches hold the KV of its first cache[0].offset tokens, and at
    least the last token is still to process. `num_draft` may be a callable asked each round
    (0: a plain step), which is how a policy turns drafting off when it does not pay.

    Plain steps in a row are pipelined as in mlx_lm's generate_step: the next one is queued
    before a token is waited for and handed out, so Python's work overlaps the forward and
    drafting turned off costs what plain decoding does. (Not with taps or logits processors, which need
    each token's value first; a consumer that stops then finds one token more in the cache,
    still one it has seen.)"""
    stats = stats if stats is not None else Stats()
    history = list(tokens)
    held = cache[0].offset
    if held >= len(history):
        raise ValueError("the cache must leave at least one token to process")
    prefill(model, proposer, cache, history[held:-1])
    pending = history[-1]
    produced = 0
    clock = time.perf_counter

    def lap(phase: str, t0: float) -> float:
        if profile:
            t1 = clock()
            stats.seconds[phase] += t1 - t0
            return t1
        return t0

    def ask() -> int:
        want = num_draft() if callable(num_draft) else num_draft
        return max(0, min(want, max_tokens - produced - 1))

    def plain_step(token) -> mx.array:
        """The target's next token after `token` (an id, or a lazy [1] array), queued."""
        inputs = token if isinstance(token, mx.array) else mx.array([token], mx.uint32)
        logits, _ = forward(model, inputs, cache)
        drawn, _ = decoding.draw(history, None, logits[0, -1:])
        mx.async_eval(drawn)
        return drawn

    pipelined = not proposer.taps and not decoding.processors
    # A round lasts from the last round's tokens being ready to its own: pipelined or not,
    # drafting or not, what the consumer did in between counts alike.
    ready = clock()
    ahead, decided = None, None  # the queued plain step; the next round's drafts, already asked
    while produced < max_tokens:
        t0 = clock()
        n = ask() if decided is None else decided
        decided = None
        if n == 0 and pipelined:
            y = ahead if ahead is not None else plain_step(pending)
            # Plain rounds in a row: the next is queued before this one is waited for, so the
            # forward never waits for Python; should drafts be asked next, its token is trimmed.
            guess = plain_step(y) if ahead is not None and produced + 1 < max_tokens else None
            ahead = None
            bonus = int(y.item())
            proposer.commit([], 0, None)
            stats.rounds += 1
            now = clock()
            if on_round is not None:
                on_round(0, 0, now - ready)
            ready = now
            history.append(bonus)
            pending = bonus
            produced += 1
            if produced < max_tokens:
                decided = ask()
                if decided == 0:
                    ahead = guess if guess is not None else plain_step(y)
                elif guess is not None:
                    trim_prompt_cache(cache, 1)
            yield bonus, False
            continue
        drafts, q = proposer.propose(pending, n, history, decoding) if n else (None, None)
        if profile and drafts is not None:
            mx.eval(drafts)
        t0 = lap("draft", t0)
        head = mx.array([pending], mx.uint32)
        inputs = head if drafts is None else mx.concatenate([head, drafts.astype(mx.uint32)])
        logits, features = forward(model, inputs, cache, proposer.taps)
        choice = decoding.target(history, drafts, logits[0])
        mx.eval(choice, *(x for x in (drafts, features) if x is not None))
        t0 = lap("verify", t0)
        drafts = drafts.tolist() if drafts is not None else []
        n = len(drafts)
        if decoding.greedy:
            targets = choice.tolist()
            accepted = accept_greedy(drafts, targets)
            bonus = targets[accepted]
        else:
            accepted, bonus = accept_sampled(drafts, choice, q, decoding.next_key())
        t0 = lap("accept", t0)
        trim_prompt_cache(cache, n - accepted)
        proposer.commit(drafts, accepted, features[:, :accepted + 1] if features is not None else None)
        lap("trim", t0)
        stats.rounds += 1
        stats.drafted += n
        stats.accepted += accepted
        now = clock()
        if on_round is not None:
            on_round(n, accepted, now - ready)
        ready = now
        kept = drafts[:accepted] + [bonus]
        history += kept
        pending = bonus
        for i, token in enumerate(kept):
            produced += 1
            yield token, i < accepted
            if produced >= max_tokens:
                return


def trim_to(caches: list, length: int) -> int:
    """Trim every cache in the list to at most `length` tokens (they may differ by a round's
    leftovers); returns the common length they now hold."""
    held = min([length] + [c.offset for c in caches])
    for c in caches:
        if c.offset > held:
            c.trim(c.offset - held)
    return held


def decoding_for(options: dict) -> Decoding:
    """The Decoding of a request's Ollama-style options (the same ones its sampler follows)."""
    from hippod.engine.sampling import make_logits_shape, make_request_processors, request_key

    return Decoding(make_logits_shape(options), make_request_processors(options), request_key(options))


class ResumeCosts:
    """Whether a sequence left alone by a shrinking batch should leave the BatchGenerator and
    draft again, from measured costs: the draft must first read the whole context (its prefill
    speed is measured on each resume), and each later token then saves the difference between
    a one-sequence batch step (measured here) and a drafting round's time per token (the
    runner's DraftPolicy, which measures the solo streams). Unmeasured, it resumes: that is how
    the numbers are first taken."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.step_seconds: dict[int, float] = {}  # batch size -> seconds of one decode step
        self.prefill_token_seconds: float | None = None  # the draft's prefill, per token

    def _ema(self, old: float | None, new: float) -> float:
        return ema(old, new, self.weight)

    def record_step(self, batch: int, seconds: float) -> None:
        self.step_seconds[batch] = self._ema(self.step_seconds.get(batch), seconds)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens:
            self.prefill_token_seconds = self._ema(self.prefill_token_seconds, seconds / tokens)

    def pays(self, context: int, remaining: int, drafting: float | None) -> bool:
        """`drafting`: seconds per token while drafting (DraftPolicy.token_seconds)."""
        plain = self.step_seconds.get(1)
        if plain is None or drafting is None or self.prefill_token_seconds is None:
            return True
        return remaining * (plain - drafting) > context * self.prefill_token_seconds

    def as_dict(self) -> dict:
        return {"step_seconds": dict(sorted(self.step_seconds.items())),
                "prefill_token_seconds": self.prefill_token_seconds}
