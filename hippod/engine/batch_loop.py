"""The runner's generation thread: one request decodes alone, several share a BatchGenerator.

mlx_lm's BatchGenerator costs about twice the per-token time of generate_step for a single
sequence (measured on an H100: 257 vs 579 tok/s for a 1B 4-bit model), and one user typing to a
Mac is the common case. So a request that arrives alone runs on generate_step (or
hippod.engine.speculative when the model has a draft); the moment a second request arrives,
the running one moves into the BatchGenerator with its KV cache, and both continue batched.

Admission: whatever is queued when the loop picks up work starts together. A request that finds
the runner idle and nothing else queued starts alone at once (no wait window); requests that
arrive together (a burst) are inserted into the BatchGenerator in one call, so they share one
batched prefill instead of the first decoding alone and the rest prefilling behind it. A burst
reaches the runner a little spread out; the daemon says which requests are right behind the
ones here (hippod.engine.arrivals), and admission waits for those, a few ms at most. A prompt
that joins a running batch is prefilled in chunks of `prefill_step_size` tokens, one chunk per
decoding step, so the streams already running keep producing a token every step.

Jobs arrive from the socket side through a thread-safe queue; events go back through each job's
`emit` callback. Cancelling a job removes it at the next step, so a client that disconnects
frees its slot at once. Finished sequences leave their KV cache in an LRU prompt cache, so the
next turn of a chat only processes the new tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import make_prompt_cache

from hippod.engine import thinking
from hippod.engine.arrivals import HOLD_SECONDS, Arrivals
from hippod.engine.embeddings import embed_texts
from hippod.engine.grammar import make_grammar_processor
from hippod.engine.logprobs import TokenTexts, token_entry
from hippod.engine.prompts import PromptError, render_prompt
from hippod.engine.sampling import (make_logits_shape, make_request_processors, make_request_sampler,
                                   request_key)
from hippod.engine.draft_policy import DraftPolicy
from hippod.engine.prompt_cache import PromptCache
from hippod.engine.speculative import Decoding, ResumeCosts, Stats, speculative_stream, trim_to
from hippod.engine.stops import StopMatcher
from hippod.engine.tool_calls import (
    ToolCallBuffer,
    forced_call_grammar,
    forced_failure,
    partial_call,
    prepare_request,
    uses_tools,
)
from hippod.protocol import (
    DoneEvent,
    EmbedRequest,
    EmbedResult,
    ErrorEvent,
    GenerateRequest,
    InfoRequest,
    TokenEvent,
)

log = logging.getLogger("hippo.runner")
RESUME_MIN_TOKENS = 16  # a sequence left alone drafts again only with this many still to go
MAIN, SPEC = "main", "spec"  # prompt-cache namespaces: target-only caches, target+draft caches
PREFILL_STEP = 512  # prompt tokens per prefill chunk beside decode: one chunk stalls a step this long
MAX_FAILED_STEPS = 3  # steps failing in a row, each for new streams, before the runner gives up


@dataclass
class AdmissionStats:
    """What admission did, for the runner's info answer and for tests."""

    solo_starts: int = 0  # requests that found the runner idle and started alone
    batch_inserts: list = field(default_factory=list)  # sizes of each insert into the generator
    prefill_chunks: list = field(default_factory=list)  # sequences in each batched prefill step
    resumes: int = 0  # sequences a shrinking batch left to draft again
    resumes_declined: int = 0  # ... and those the measured costs kept in the batch
    costs: ResumeCosts = field(default_factory=ResumeCosts)
    draft: DraftPolicy | None = None  # what drafting costs and yields here, for every stream
    arrivals: Arrivals = field(default_factory=Arrivals)  # requests the daemon said are coming

    def as_dict(self) -> dict:
        return {"solo_starts": self.solo_starts, "batch_inserts": self.batch_inserts[-64:],
                "prefill_chunks": self.prefill_chunks[-64:], "numbered": self.arrivals.told, "held": self.arrivals.waits,
                "given_up": self.arrivals.given_up, "resumes": self.resumes,
                "resumes_declined": self.resumes_declined, "draft_costs": self.costs.as_dict(),
                "draft_policy": self.draft.as_dict() if self.draft is not None else None}


@dataclass
class Job:
    request: object
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Active:
    job: Job
    detokenizer: object
    stops: StopMatcher
    tokens: list[int]  # everything the KV cache holds or will hold: prompt, then generated
    prompt_tokens: int
    cached_tokens: int
    max_tokens: int
    sampler: object
    processors: list
    started: float
    uid: int | None = None  # set while in the BatchGenerator
    solo: object = None  # the generate_step iterator while decoding alone
    cache: list | None = None  # the solo KV cache
    speculative: bool = False
    spec: Stats | None = None  # drafted/accepted of a speculative solo stream
    first_token_at: float | None = None
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    grammar: object = None  # the GrammarProcessor (also in processors) of a constrained request
    tools: ToolCallBuffer | None = None  # set when the answer may hold tool calls
    top_logprobs: int | None = None  # None: no logprobs; else alternatives per token
    pending_logprobs: list = field(default_factory=list)  # entries not yet sent with an event
    thinking: object = None  # the ThinkingSplitter of a reasoning model's answer
    unsent: list[int] = field(default_factory=list)  # ids decoded since the last text sent


def _vocab_size(tokenizer) -> int:
    """Ids the tokenizer knows, added tokens included (a wrapper's vocab_size may leave them out)."""
    try:
        return len(getattr(tokenizer, "_tokenizer", tokenizer))
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 2**31))


class BatchLoop:
    def __init__(self, model, tokenizer, *, num_parallel: int, context_length: int,
                 info: Callable[[int], object], drafter=None, num_draft: int = 3, draft_policy: str = "measured",
                 prompt_cache_bytes: int = 2 * 2**30, prefill_step_size: int = PREFILL_STEP,
                 hold: float = HOLD_SECONDS, prefill_batch: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.num_parallel = num_parallel
        self.context_length = context_length
        self.info = info
        # A drafter (drafts.ModelDrafter, dflash.DFlashDraft) speculates for solo requests.
        self.drafter = drafter
        self.num_draft = getattr(drafter, "block_size", num_draft + 1) - 1 if drafter else 0
        self.num_layers = len(make_prompt_cache(model))
        self.eos = set(tokenizer.eos_token_ids)
        self.vocab_size = _vocab_size(tokenizer)
        self.token_texts = TokenTexts(tokenizer)
        self.think_markers = thinking.markers(tokenizer)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.batched: dict[int, _Active] = {}
        self.solo: _Active | None = None
        self.prompt_cache = PromptCache(max_size=64, max_bytes=prompt_cache_bytes)
        self.stats = AdmissionStats(arrivals=Arrivals(hold),
                                    draft=DraftPolicy(self.num_draft, always=draft_policy == "always")
                                    if drafter else None)
        self.prefill_batch, self.prefill_step_size = prefill_batch, prefill_step_size
        self.failed_in_a_row = 0  # decoding steps that raised since the last that did not
        self.generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=self.num_parallel,
            # A burst of up to prefill_batch prompts prefills in one pass; a larger one in groups
            # of that size, each group's first tokens out before the next group's pass (None:
            # every slot at once).
            prefill_batch_size=min(self.prefill_batch or self.num_parallel, self.num_parallel),
            prefill_step_size=self.prefill_step_size,
        )

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    @property
    def running(self) -> int:
        return len(self.batched) + (self.solo is not None)

    def run_forever(self, after_step: Callable[[], None] = lambda: None) -> None:
        """`after_step` runs once per decoding step: the runner hands that step's events to its
        event loop in one wake-up instead of one per token."""
        while True:
            self._take_new(self._idle_wait())
            self._drop_cancelled()
            self._admit()
            try:
                if self.solo is not None:
                    self._step_solo()
                    self.failed_in_a_row = 0
                elif self.batched:
                    self._step_batch()
                    self.failed_in_a_row = 0
            except Exception as e:
                self.failed_in_a_row += 1
                if self.failed_in_a_row > MAX_FAILED_STEPS:
                    raise  # the device or the model is broken, not one request: a new runner may mend it
                self._step_failed(e)
            after_step()

    def _step_failed(self, exc: Exception) -> None:
        """A decoding step raised. The streams it was decoding get a 500 that names the fault,
        and the loop goes on (a fresh generator, when a batch step failed: its state is unknown
        now), so queued requests and the next ones are served without a reload."""
        log.exception("a decoding step failed")
        failed = ([self.solo] if self.solo is not None else []) + list(self.batched.values())
        for a in failed:
            a.job.emit(ErrorEvent(f"generation failed: {exc}", status=500))
        if self.batched:
            self.batched.clear()
            try:
                self.generator.close()
            except Exception:
                log.exception("the failed generator did not close")
            self.generator = self._new_generator()
        self.solo = None
        mx.clear_cache()  # what the failed streams held goes back (an out-of-memory step, say)

    # -- intake ---------------------------------------------------------------------------

    def _idle_wait(self) -> float | None:
        """How long the loop may wait for new work: not at all while something decodes, for
        good when nothing is queued either, else until the requests on their way are due."""
        if self.running:
            return 0.0
        if not self.waiting:
            return None
        return self._held()

    def _held(self) -> float:
        """Seconds admission still waits for requests the daemon said are right behind the
        queued ones (only while they would fit beside them)."""
        if self.running + len(self.waiting) >= self.num_parallel:
            return 0.0
        return self.stats.arrivals.wait()

    def _take_new(self, timeout: float | None) -> None:
        """Route every job in the inbox, waiting up to `timeout` seconds (None: for good) for
        the first."""
        try:
            job = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._route(job)
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _route(self, job: Job) -> None:
        req = job.request
        if isinstance(req, InfoRequest):
            job.emit(self.info(self.running + len(self.waiting)))
        elif isinstance(req, EmbedRequest):
            self._embed(job)
        else:
            self.stats.arrivals.came(req.arrival, req.arrived)
            self.waiting.append(job)

    def _embed(self, job: Job) -> None:
        req: EmbedRequest = job.request
        t0 = time.perf_counter()
        try:
            vectors, n = embed_texts(self.model, self.tokenizer, req.inputs,
                                     max_tokens=req.num_ctx or self.context_length,
                                     truncate=req.truncate)
        except ValueError as e:
            job.emit(ErrorEvent(str(e), status=400))
            return
        job.emit(EmbedResult(vectors, n, time.perf_counter() - t0))

    def _drop_cancelled(self) -> None:
        if self.solo is not None and self.solo.job.cancelled.is_set():
            self.solo = None
        gone = [uid for uid, a in self.batched.items() if a.job.cancelled.is_set()]
        if gone:
            self.generator.remove(gone)
            for uid in gone:
                del self.batched[uid]
        if any(j.cancelled.is_set() for j in self.waiting):
            self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())

    def _admit(self) -> None:
        if self.waiting and self._held() > 0:
            return
        starting = self._prepare_waiting()
        if not starting:
            return
        if self.running == 0 and len(starting) == 1:
            self.stats.solo_starts += 1
            self._start(self._start_solo, starting[0])
            return
        if self.solo is not None:
            self._move_solo_to_batch()
        self._start(self._insert_batch, starting)

    def _prepare_waiting(self) -> list[_Active]:
        """Prepare every queued request there is room for. After one pass the inbox is read
        again: requests that came in while the first ones were tokenized join them."""
        starting: list[_Active] = []
        looked_again = False
        while self.running + len(starting) < self.num_parallel:
            if not self.waiting:
                if looked_again:
                    break
                looked_again = True
                self._take_new(0)
                continue
            job = self.waiting.popleft()
            active = self._start(self._prepare, job)
            if active is not None:
                starting.append(active)
        return starting

    def _start(self, step: Callable, arg):
        """Run one admission step; a bad request gets its error and never takes the runner down."""
        try:
            return step(arg)
        except PromptError as e:
            for a in arg if isinstance(arg, list) else [arg]:
                self._job_of(a).emit(ErrorEvent(str(e), status=400))
        except Exception as e:
            log.exception("could not start request")
            for a in arg if isinstance(arg, list) else [arg]:
                self._job_of(a).emit(ErrorEvent(f"could not start generation: {e}", status=500))
        return None

    @staticmethod
    def _job_of(item) -> Job:
        return item if isinstance(item, Job) else item.job

    def _prepare(self, job: Job) -> _Active | None:
        req: GenerateRequest = job.request
        opts = req.options
        tokens = render_prompt(self.tokenizer, prepare_request(self.tokenizer, req),
                               thinking.template_kwargs(self.tokenizer, req.think))
        if not tokens:
            raise PromptError("the prompt is empty after applying the chat template")
        num_ctx = min(int(opts.get("num_ctx") or self.context_length), self.context_length)
        num_predict = int(opts["num_predict"]) if opts.get("num_predict") is not None else -1
        if len(tokens) >= num_ctx:
            # Keep the end of an over-long prompt, leaving room to answer (Ollama truncates too).
            reserve = min(num_predict if num_predict > 0 else num_ctx // 4, num_ctx // 2)
            tokens = tokens[-(num_ctx - max(reserve, 1)):]
        resume = [int(t) for t in req.resume or []]
        if any(not 0 <= t < self.vocab_size for t in resume):
            # A replay of ids the model never made: MLX would read outside the embedding table.
            raise PromptError(f"resume holds token ids outside the model's vocabulary of {self.vocab_size}")
        room = num_ctx - len(tokens)
        max_tokens = room if num_predict < 0 else min(num_predict, room)
        if max_tokens - len(resume) <= 0:
            job.emit(DoneEvent("length", len(tokens), len(resume), 0.0, 0.0))
            return None
        stop = opts.get("stop") or []  # checked and normalised by the API (api/request.py)
        processors = make_request_processors(opts)
        tool_grammar = forced_call_grammar(req) if uses_tools(req) else None
        if tool_grammar:
            stop = []  # a required call is the whole answer: stop sequences apply to content
        grammar = None
        if tool_grammar or req.grammar:  # last, so nothing after it revives a forbidden token
            grammar = make_grammar_processor(self.tokenizer, tool_grammar or req.grammar)
            processors.append(grammar)
        tools = (ToolCallBuffer(self.tokenizer, req.tools, forced=tool_grammar is not None)
                 if uses_tools(req) else None)
        active = _Active(job, self.tokenizer.detokenizer, StopMatcher(stop), list(tokens),
                         prompt_tokens=len(tokens), cached_tokens=0, max_tokens=max_tokens,
                         sampler=make_request_sampler(opts, len(resume)), processors=processors,
                         started=time.perf_counter(), grammar=grammar, tools=tools,
                         top_logprobs=req.logprobs, thinking=self._splitter(tokens, req))
        self._replay(active, resume)
        return active

    @staticmethod
    def _replay(a: _Active, ids: list[int]) -> None:
        """Bring a resumed request to where its first runner stopped: the ids join the KV
        input, and pass through every per-token state (text, stops, tools, grammar) unsent."""
        for token in ids:
            a.tokens.append(token)
            a.completion_tokens += 1
            a.detokenizer.add_token(token)
            text, _ = a.stops.feed(a.detokenizer.last_segment)
            if a.thinking is not None:
                text, _ = a.thinking.feed(text)
            if a.tools is not None:
                a.tools.feed(text)
            if a.grammar is not None:
                a.grammar.advance(token)

    def _splitter(self, tokens: list[int], req: GenerateRequest) -> thinking.ThinkingSplitter | None:
        """Thinking is split from the answer for chat requests to a reasoning model (a raw
        completion gets the model's text as it is)."""
        if self.think_markers is None or req.raw or req.grammar:
            return None
        inside = thinking.starts_inside(self.tokenizer, tokens, self.think_markers)
        return thinking.ThinkingSplitter(self.think_markers, inside)

    def _cached(self, namespace: str, tokens: list[int]) -> tuple[list | None, list[int]]:
        """The longest cached prefix's KV (a copy) and the tokens still to process (never none)."""
        return self.prompt_cache.nearest(namespace, tokens)

    def _remember(self, namespace: str, tokens: list[int], cache: list) -> None:
        self.prompt_cache.remember(namespace, tokens, cache)

    # -- decoding alone ------------------------------------------------------------------

    def _start_solo(self, a: _Active) -> None:
        # Drafts are checked and rolled back: a grammar's matcher cannot follow that.
        a.speculative = self.drafter is not None and a.grammar is None
        namespace = SPEC if a.speculative else MAIN
        cache, rest = self._cached(namespace, a.tokens)
        if cache is None:
            cache = make_prompt_cache(self.model)
            if a.speculative:
                cache += self.drafter.make_cache()
        a.cached_tokens = min(a.prompt_tokens, len(a.tokens) - len(rest))
        a.cache = cache
        if a.speculative:
            a.solo = self._speculate(a)
        else:
            a.solo = generate_step(mx.array(rest), self.model, max_tokens=a.max_tokens - a.completion_tokens,
                                   sampler=a.sampler, prompt_cache=cache,
                                   logits_processors=_seeing(a.tokens[:len(a.tokens) - len(rest)], a))
        self.solo = a

    def _step_solo(self) -> None:
        a = self.solo
        try:
            item = next(a.solo)
        except StopIteration:
            self._finish(a, "length", time.perf_counter())
            return
        token = int(item[0])
        a.tokens.append(token)
        reason = None
        if token in self.eos:
            reason = "stop"
        elif a.completion_tokens + 1 >= a.max_tokens:
            reason = "length"
        if self._deliver(a, token, reason, item[1]):
            return

    def _speculate(self, a: _Active, proposer=None):
        """The solo speculative stream of `a`: its draft state, its sampling; the runner's policy."""
        target, draft = a.cache[: self.num_layers], a.cache[self.num_layers:]
        opts = a.job.request.options
        policy = self.stats.draft
        policy.begin()
        a.spec = Stats()
        proposer = proposer or self.drafter.proposer(draft)
        stream = speculative_stream(
            self.model, proposer, target, a.tokens,
            max_tokens=a.max_tokens - a.completion_tokens,
            # a remote draft whose peer left drafts no more: the stream goes on plain
            num_draft=lambda: 0 if getattr(proposer, "dead", False) else policy(), decoding=Decoding(make_logits_shape(opts), a.processors, request_key(opts)),
            stats=a.spec, on_round=policy.record)
        return stream

    def _speculate_again(self) -> None:
        """Speculation is decided per step: it runs while a sequence decodes alone, since the
        batch path has no draft. When a batch is down to its last sequence, that one leaves the
        BatchGenerator and drafts again, once its draft model has read the context, if the
        measured costs say the tokens left repay that read (ResumeCosts). A DFlash draft would
        need the target's hidden states of the whole context, so it stays."""
        if (self.drafter is None or getattr(self.drafter, "kind", "") != "model" or self.solo is not None
                or self.waiting or len(self.batched) != 1):
            return
        uid, a = next(iter(self.batched.items()))
        remaining = a.max_tokens - a.completion_tokens
        if a.grammar is not None or remaining < RESUME_MIN_TOKENS:
            return
        if not self.stats.costs.pays(len(a.tokens), remaining, self.stats.draft.token_seconds()):
            self.stats.resumes_declined += 1
            return
        (cache, _), = self.generator.remove([uid], return_prompt_caches=True).values()
        del self.batched[uid]
        trim_to(cache, len(a.tokens) - 1)
        draft = self.drafter.make_cache()
        proposer = self.drafter.proposer(draft)
        t0 = time.perf_counter()
        proposer.prefill(a.tokens[:cache[0].offset], None)
        self.stats.costs.record_prefill(cache[0].offset, time.perf_counter() - t0)
        self.stats.resumes += 1
        a.uid, a.cache, a.speculative = None, list(cache) + draft, True
        a.solo = self._speculate(a, proposer)
        self.solo = a

    def _count_speculation(self, a: _Active) -> None:
        a.drafted += a.spec.drafted
        a.accepted += a.spec.accepted
        a.spec = Stats()

    def _move_solo_to_batch(self) -> None:
        """A second request arrived: continue the solo sequence inside the BatchGenerator."""
        a, self.solo = self.solo, None
        a.solo.close()
        cache = a.cache[: self.num_layers]
        # The cache must hold every token but the last, which the batch feeds in next.
        held = trim_to(a.cache if a.speculative else cache, len(a.tokens) - 1)
        if a.speculative:
            self._count_speculation(a)
            self._remember(SPEC, a.tokens, a.cache)
        remaining = a.max_tokens - a.completion_tokens
        if a.grammar is not None:  # the batch shows it the last token, already consumed, again
            a.grammar.expect_repeat()
        (uid,) = self.generator.insert(
            [a.tokens[held:]], max_tokens=[max(remaining, 1)], caches=[cache],
            all_tokens=[a.tokens[:held]], samplers=[a.sampler], logits_processors=[a.processors])
        a.uid, a.solo, a.cache, a.speculative = uid, None, None, False
        self.batched[uid] = a

    # -- decoding together ----------------------------------------------------------------

    def _insert_batch(self, starting: list[_Active]) -> None:
        """One insert for all of them: the generator prefills them as one batch."""
        prompts, caches, held = [], [], []
        for a in starting:
            cache, rest = self._cached(MAIN, a.tokens)
            kept = len(a.tokens) - len(rest)  # a resumed request's tokens are part of its prompt here
            a.cached_tokens = min(a.prompt_tokens, kept)
            prompts.append(rest)
            caches.append(cache)
            held.append(a.tokens[:kept])
        uids = self.generator.insert(
            prompts, max_tokens=[a.max_tokens - a.completion_tokens for a in starting], caches=caches, all_tokens=held,
            samplers=[a.sampler for a in starting],
            logits_processors=[a.processors for a in starting])
        for uid, a in zip(uids, starting):
            a.uid = uid
            self.batched[uid] = a
        self.stats.batch_inserts.append(len(starting))

    def _step_batch(self) -> None:
        size, t0 = len(self.batched), time.perf_counter()
        prompt_responses, responses = self.generator.next()
        prefilled = sum(1 for r in prompt_responses if not r.end_of_prompt)
        if prefilled:
            self.stats.prefill_chunks.append(prefilled)
        elif responses and not prompt_responses:  # a plain decode step: what drafting competes with
            self.stats.costs.record_step(size, time.perf_counter() - t0)
        for r in responses:
            a = self.batched.get(r.uid)
            if a is None:
                continue
            a.tokens.append(int(r.token))
            reason = r.finish_reason
            if reason is not None:
                # The generator dropped the sequence itself; keep its KV for the next turn.
                del self.batched[r.uid]
                if r.prompt_cache is not None:
                    self._remember(MAIN, r.all_tokens or a.tokens, r.prompt_cache)
            if self._deliver(a, int(r.token), reason, r.logprobs) and reason is None:
                # A stop string ended it while the generator still runs it: take it out.
                caches = self.generator.remove([r.uid], return_prompt_caches=True)
                self.batched.pop(r.uid, None)
                for cache, tokens in caches.values():
                    self._remember(MAIN, tokens, cache)
        self._speculate_again()

    # -- shared ---------------------------------------------------------------------------

    def _deliver(self, a: _Active, token: int, reason: str | None, logprobs=None) -> bool:
        """Emit a token's text; returns True when the request finished."""
        now = time.perf_counter()
        if a.first_token_at is None:
            a.first_token_at = now
        det = a.detokenizer
        if reason == "stop" and token in self.eos:  # end of sequence: not part of the answer
            det.finalize()
        else:
            a.completion_tokens += 1
            det.add_token(token)
            if a.top_logprobs is not None and logprobs is not None:
                a.pending_logprobs.append(token_entry(self.token_texts, logprobs, token, a.top_logprobs))
            if reason is not None:
                det.finalize()
        text, hit_stop = a.stops.feed(det.last_segment)
        if reason is not None and not hit_stop:
            text += a.stops.flush()
        ending = hit_stop or reason is not None
        thought = ""
        if a.thinking is not None:  # the answer goes on to the tool-call buffer, thinking does not
            text, thought = a.thinking.feed(text)
            if ending:
                rest, more = a.thinking.flush()
                text, thought = text + rest, thought + more
        calls = None
        if a.tools is not None:  # tool-call markup is parsed at the end, never streamed
            text = a.tools.feed(text)
            if ending:
                rest, calls = a.tools.finish()
                text += rest
        counted = not (reason == "stop" and token in self.eos)
        if text or thought or (ending and a.pending_logprobs):
            ids = a.unsent + [token] if counted else a.unsent
            a.job.emit(TokenEvent(text, token, thinking=thought, logprobs=a.pending_logprobs or None,
                                  ids=ids if ids != [token] else None))
            a.unsent, a.pending_logprobs = [], []
        elif counted:
            a.unsent.append(token)
        if ending:  # parsed calls are a complete answer, even on the budget's last token
            self._finish(a, "stop" if hit_stop or calls else reason, now, calls)
            return True
        return False

    def _finish(self, a: _Active, reason: str, now: float, tool_calls: list | None = None) -> None:
        first = a.first_token_at or now
        if self.solo is a:
            self.solo = None
            if a.speculative:
                self._count_speculation(a)
            self._remember(SPEC if a.speculative else MAIN, a.tokens, a.cache)
        partial = None
        unparsed = a.tools.unparsed if a.tools is not None else None
        if unparsed is not None:  # a required call that did not parse is never passed off as text
            if reason != "length":
                a.job.emit(ErrorEvent(forced_failure(unparsed, a.tools.tools), status=500))
                return
            partial = [partial_call(unparsed)]
        a.job.emit(DoneEvent(reason, a.prompt_tokens, a.completion_tokens,
                             prompt_seconds=first - a.started, eval_seconds=now - first,
                             cached_tokens=a.cached_tokens, drafted=a.drafted, accepted=a.accepted,
                             tool_calls=tool_calls or None, partial_tool_calls=partial))


def _seeing(cached: list[int], a: _Active) -> list | None:
    """The request's logits processors, shown the cached prefix of the prompt too.

    generate_step shows its processors only the tokens it is given, so after a prompt-cache hit
    a repetition penalty would see a shorter history than on a cold run and greedy output would
    depend on the cache. (The BatchGenerator is given the prefix as `all_tokens`.)
    """
    if not a.processors:
        return None
    if not cached:
        return a.processors
    head = mx.array(cached)

    def seeing(processor):
        if processor is a.grammar:  # reads only the newest token
            return processor
        return lambda tokens, logits: processor(mx.concatenate([head, tokens]), logits)

    return [seeing(p) for p in a.processors]
