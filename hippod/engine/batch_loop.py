"""The runner's generation thread: every request joins one mlx_lm BatchGenerator.

Jobs arrive from the socket side through a thread-safe queue; events go back through each job's
`emit` callback. Cancelling a job removes it from the batch at the next step, so a client that
disconnects frees its slot at once.
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
from mlx_lm.generate import BatchGenerator

from hippod.engine.embeddings import embed_texts
from hippod.engine.grammar import make_grammar_processor
from hippod.engine.prompts import PromptError, render_prompt
from hippod.engine.sampling import make_request_processors, make_request_sampler
from hippod.engine.stops import StopMatcher
from hippod.engine.tool_calls import (
    ToolCallBuffer,
    forced_call_grammar,
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


@dataclass
class Job:
    request: object
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Active:
    job: Job
    uid: int
    detokenizer: object
    stops: StopMatcher
    prompt_tokens: int
    started: float
    first_token_at: float | None = None
    completion_tokens: int = 0
    tools: ToolCallBuffer | None = None  # set when the answer may hold tool calls


class BatchLoop:
    def __init__(self, model, tokenizer, *, num_parallel: int, context_length: int,
                 info: Callable[[int], object]):
        self.model = model
        self.tokenizer = tokenizer
        self.num_parallel = num_parallel
        self.context_length = context_length
        self.info = info
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.active: dict[int, _Active] = {}
        self.generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=num_parallel,
            prefill_batch_size=min(num_parallel, 8),
        )

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def run_forever(self) -> None:
        while True:
            self._take_new(block=not self.active and not self.waiting)
            self._drop_cancelled()
            self._admit()
            if self.active:
                self._step()

    # -- intake ---------------------------------------------------------------------------

    def _take_new(self, block: bool) -> None:
        try:
            job = self.inbox.get(block=block, timeout=None if block else 0)
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
            job.emit(self.info(len(self.active) + len(self.waiting)))
        elif isinstance(req, EmbedRequest):
            self._embed(job)
        else:
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
        gone = [uid for uid, a in self.active.items() if a.job.cancelled.is_set()]
        if gone:
            self.generator.remove(gone)
            for uid in gone:
                del self.active[uid]
        if any(j.cancelled.is_set() for j in self.waiting):
            self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.num_parallel:
            job = self.waiting.popleft()
            try:
                self._insert(job)
            except PromptError as e:
                job.emit(ErrorEvent(str(e), status=400))
            except Exception as e:  # a bad request must not take the runner down
                log.exception("could not start request")
                job.emit(ErrorEvent(f"could not start generation: {e}", status=500))

    def _insert(self, job: Job) -> None:
        req: GenerateRequest = job.request
        opts = req.options
        tokens = render_prompt(self.tokenizer, prepare_request(self.tokenizer, req))
        num_ctx = min(int(opts.get("num_ctx") or self.context_length), self.context_length)
        num_predict = int(opts.get("num_predict", -1) if opts.get("num_predict") is not None else -1)
        if len(tokens) >= num_ctx:
            # Keep the end of an over-long prompt, leaving room to answer (Ollama truncates too).
            reserve = min(num_predict if num_predict > 0 else num_ctx // 4, num_ctx // 2)
            tokens = tokens[-(num_ctx - max(reserve, 1)):]
        room = num_ctx - len(tokens)
        max_tokens = room if num_predict < 0 else min(num_predict, room)
        if max_tokens <= 0:
            job.emit(DoneEvent("length", len(tokens), 0, 0.0, 0.0))
            return
        stop = opts.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        processors = make_request_processors(opts)
        tool_grammar = forced_call_grammar(req) if uses_tools(req) else None
        grammar = tool_grammar or req.grammar
        if grammar:  # last, so nothing after it can revive a token the grammar forbids
            processors.append(make_grammar_processor(self.tokenizer, grammar))
        tools = (ToolCallBuffer(self.tokenizer, req.tools, forced=tool_grammar is not None)
                 if uses_tools(req) else None)
        (uid,) = self.generator.insert(
            [tokens],
            max_tokens=[max_tokens],
            samplers=[make_request_sampler(opts)],
            logits_processors=[processors],
        )
        self.active[uid] = _Active(job, uid, self.tokenizer.detokenizer, StopMatcher(list(stop)),
                                   len(tokens), time.perf_counter(), tools=tools)

    # -- decoding -------------------------------------------------------------------------

    def _step(self) -> None:
        _, responses = self.generator.next()
        now = time.perf_counter()
        finished = []
        for r in responses:
            a = self.active.get(r.uid)
            if a is None:
                continue
            if a.first_token_at is None:
                a.first_token_at = now
            det = a.detokenizer
            if r.finish_reason == "stop":  # an end-of-sequence token: not part of the answer
                det.finalize()
            else:
                a.completion_tokens += 1
                det.add_token(r.token)
                if r.finish_reason is not None:
                    det.finalize()
            text, hit_stop = a.stops.feed(det.last_segment)
            if r.finish_reason is not None and not hit_stop:
                text += a.stops.flush()
            ending = hit_stop or r.finish_reason is not None
            calls = None
            if a.tools is not None:  # tool-call markup is parsed at the end, never streamed
                text = a.tools.feed(text)
                if ending:
                    rest, calls = a.tools.finish()
                    text += rest
            if text:
                a.job.emit(TokenEvent(text, int(r.token)))
            if ending:
                reason = "stop" if hit_stop else r.finish_reason
                self._finish(a, reason, now, calls)
                finished.append((r.uid, hit_stop and r.finish_reason is None))
        still_running = [uid for uid, needs_remove in finished if needs_remove]
        if still_running:
            self.generator.remove(still_running)

    def _finish(self, a: _Active, reason: str, now: float, tool_calls: list | None = None) -> None:
        first = a.first_token_at or now
        a.job.emit(DoneEvent(reason, a.prompt_tokens, a.completion_tokens,
                             prompt_seconds=first - a.started, eval_seconds=now - first,
                             tool_calls=tool_calls or None))
        del self.active[a.uid]


def current_memory() -> tuple[int, int]:
    return mx.get_active_memory(), mx.get_peak_memory()
