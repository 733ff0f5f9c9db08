"""Admission in the runner's generation loop, on a real MLX model (a tiny random llama).

A burst that is queued together shares one batched prefill and gives the same greedy tokens
as the same requests run one by one; a long prompt that joins a running stream is prefilled in
chunks beside decode, so the running stream keeps getting a token every step. Counted in steps
and tokens, never in wall time, so a loaded CPU cannot make them flaky.
"""

from __future__ import annotations

import math
import threading

import pytest

from hippod.engine.batch_loop import BatchLoop, Job
from hippod.protocol import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent
from tests.modelfiles import make_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mlx_lm import load

    path = make_tiny_llama(tmp_path_factory.mktemp("admission") / "m", num_layers=2, seed=5)
    return load(str(path))


class Recorder:
    """Collects every job's events in the order the generation thread emitted them."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.done: dict[str, threading.Event] = {}

    def job(self, name: str, prompt: str, num_predict: int) -> Job:
        self.done[name] = threading.Event()

        def emit(ev, name=name):
            self.events.append((name, ev))
            if isinstance(ev, (DoneEvent, ErrorEvent)):
                self.done[name].set()

        req = GenerateRequest(prompt=prompt, raw=True,
                              options={"temperature": 0, "num_predict": num_predict})
        return Job(req, emit)

    def tokens(self, name: str) -> list[int]:
        return [ev.token for n, ev in self.events if n == name and isinstance(ev, TokenEvent)]

    def wait(self, *names: str, timeout: float = 120) -> None:
        for n in names:
            assert self.done[n].wait(timeout), f"{n} did not finish"
            final = [ev for m, ev in self.events if m == n][-1]
            assert isinstance(final, DoneEvent), final


def _loop(model, **kw) -> BatchLoop:
    m, tok = model
    return BatchLoop(m, tok, num_parallel=8, context_length=2048, info=lambda n: None, **kw)


def _run(loop: BatchLoop) -> None:
    threading.Thread(target=loop.run_forever, daemon=True).start()


PROMPTS = [f"{w} and then the {w} went on" for w in
           ("apple", "river", "stone", "cloud", "tiger", "lamp", "violin", "harbor")]


def test_a_burst_shares_one_prefill_and_keeps_greedy_tokens(model):
    seq = Recorder()
    alone = _loop(model)
    _run(alone)
    for i, p in enumerate(PROMPTS):  # one by one: each starts alone on the solo path
        alone.submit(seq.job(str(i), p, 12))
        seq.wait(str(i))
    assert alone.stats.solo_starts == len(PROMPTS)

    burst = Recorder()
    loop = _loop(model)
    for i, p in enumerate(PROMPTS):  # all queued when the loop picks up work
        loop.submit(burst.job(str(i), p, 12))
    _run(loop)
    burst.wait(*map(str, range(len(PROMPTS))))
    for i in range(len(PROMPTS)):
        assert burst.tokens(str(i)) == seq.tokens(str(i)), f"request {i} changed under batching"
    assert loop.stats.solo_starts == 0
    assert loop.stats.batch_inserts == [len(PROMPTS)]
    assert loop.stats.prefill_chunks == [len(PROMPTS)], "the burst was not prefilled as one batch"


def test_a_burst_wider_than_prefill_batch_prefills_in_groups_the_first_answering_first(model):
    """Past prefill_batch, a burst prefills in groups between decode steps: the first group's
    first tokens come before the second group is prefilled, and greedy tokens do not change."""
    ref = Recorder()
    one = _loop(model)
    for i, p in enumerate(PROMPTS):
        one.submit(ref.job(str(i), p, 8))
    _run(one)
    ref.wait(*map(str, range(len(PROMPTS))))

    rec = Recorder()
    loop = _loop(model, prefill_batch=4)
    assert loop.generator.prefill_batch_size == 4
    for i, p in enumerate(PROMPTS):
        loop.submit(rec.job(str(i), p, 8))
    _run(loop)
    rec.wait(*map(str, range(len(PROMPTS))))
    assert loop.stats.batch_inserts == [len(PROMPTS)]
    assert loop.stats.prefill_chunks == [4, 4], loop.stats.prefill_chunks
    order = [n for n, ev in rec.events if isinstance(ev, TokenEvent)]
    before_second = order[:order.index("4")]
    # One pass of 8 would give every stream its first token in the same step ("01234567").
    assert set(before_second) == set("0123") and len(before_second) >= 8, \
        f"the first group waited: {''.join(order)}"
    for i in range(len(PROMPTS)):
        assert rec.tokens(str(i)) == ref.tokens(str(i)), f"request {i} changed under grouped prefill"
    assert _loop(model, prefill_batch=64).generator.prefill_batch_size == 8  # never past num_parallel


def test_a_long_prompt_joins_without_stalling_a_running_stream(model):
    step = 64
    rec = Recorder()
    loop = _loop(model, prefill_step_size=step)
    _run(loop)
    loop.submit(rec.job("a", "The lighthouse keeper climbed", 300))
    while len(rec.tokens("a")) < 3:
        rec.done["a"].wait(0.01)
    long_prompt = " ".join(f"word{i}" for i in range(400))
    before = len(rec.events)
    loop.submit(rec.job("b", long_prompt, 4))
    rec.wait("a", "b")

    b_tokens = len(loop.tokenizer.encode(long_prompt, add_special_tokens=False))
    chunks = math.ceil((b_tokens - 1) / step)
    assert chunks >= 10
    assert sum(1 for n in loop.stats.prefill_chunks if n) >= chunks  # it was prefilled in chunks
    # Between B's arrival and its first token, A kept decoding: about one token per chunk.
    later = rec.events[before:]
    first_b = next(i for i, (n, ev) in enumerate(later) if n == "b" and isinstance(ev, TokenEvent))
    a_meanwhile = sum(1 for n, ev in later[:first_b] if n == "a" and isinstance(ev, TokenEvent))
    assert a_meanwhile >= chunks - 2, (a_meanwhile, chunks)

    # And A's tokens are the ones it makes alone.
    alone = Recorder()
    solo = _loop(model)
    _run(solo)
    solo.submit(alone.job("a", "The lighthouse keeper climbed", 300))
    alone.wait("a")
    assert rec.tokens("a") == alone.tokens("a")


def _ids(rec: Recorder, name: str) -> list[int]:
    return [t for n, ev in rec.events if n == name and isinstance(ev, TokenEvent) for t in (ev.ids or [ev.token])]


def test_a_sequence_left_alone_drafts_again_only_when_the_measured_costs_say_it_pays(model):
    """The long request drafts alone, joins the batch when a short one comes, and is alone
    again once it ends: it leaves the batch to draft again unless the measured costs say a
    one-sequence batch step beats drafting. Either way its tokens are the plain ones."""
    from hippod.engine.drafts import ModelDrafter, self_draft

    plain = Recorder()
    base = _loop(model)
    _run(base)
    base.submit(plain.job("long", PROMPTS[0], 160))
    plain.wait("long")
    for costly in (False, True):
        rec = Recorder()
        loop = _loop(model, drafter=ModelDrafter(self_draft(model[0], 1)), num_draft=3)
        if costly:  # as measured on a machine where drafting loses: 1 ms steps, 1 s rounds
            loop.stats.costs.record_step(1, 0.001)
            loop.stats.draft.t_round[3] = 1.0  # a round of 3 drafts, none kept: 1 s
            loop.stats.costs.record_prefill(1, 0.001)
        _run(loop)
        loop.submit(rec.job("long", PROMPTS[0], 160))
        while not _ids(rec, "long"):
            rec.done["long"].wait(0.005)
        loop.submit(rec.job("short", PROMPTS[1], 2))
        rec.wait("long", "short")
        assert _ids(rec, "long") == _ids(plain, "long"), costly
        assert loop.stats.batch_inserts == [1]  # the short one joined the long one in the batch
        if costly:
            assert loop.stats.resumes == 0 and loop.stats.resumes_declined > 0
        else:
            assert loop.stats.resumes == 1 and loop.stats.resumes_declined == 0


def _numbered(rec: Recorder, name: str, prompt: str, num_predict: int, number: int, told: int) -> Job:
    """A job as the daemon sends it: its number, and how many it had numbered by then."""
    from dataclasses import replace

    job = rec.job(name, prompt, num_predict)
    job.request = replace(job.request, arrival=number, arrived=told)
    return job


def test_a_burst_the_daemon_numbered_goes_in_as_one_insert_however_it_trickles_in(model):
    rec = Recorder()
    loop = _loop(model, hold=60.0)  # the rule waits for exact numbers: a long hold costs a burst nothing
    _run(loop)
    n = len(PROMPTS)
    loop.submit(_numbered(rec, "0", PROMPTS[0], 6, 1, 3))  # sent when the daemon had numbered 3
    for i in range(1, n):  # the rest trickle in, the later ones numbered later
        rec.done["0"].wait(0.02)
        loop.submit(_numbered(rec, str(i), PROMPTS[i], 6, i + 1, min(i + 3, n)))
    rec.wait(*map(str, range(n)))
    assert loop.stats.solo_starts == 0
    assert loop.stats.batch_inserts == [n]
    assert loop.stats.prefill_chunks == [n]
    assert (loop.stats.arrivals.waits, loop.stats.arrivals.given_up) == (1, 0)


def test_a_lone_request_starts_at_once_and_a_lost_one_costs_only_the_hold(model):
    rec = Recorder()
    loop = _loop(model, hold=60.0)
    _run(loop)
    loop.submit(_numbered(rec, "lone", PROMPTS[0], 4, 1, 1))  # nothing behind it: no wait
    rec.wait("lone")
    assert loop.stats.solo_starts == 1 and loop.stats.arrivals.waits == 0

    short = _loop(model, hold=0.05)
    _run(short)
    short.submit(_numbered(rec, "a", PROMPTS[1], 4, 1, 2))  # number 2 never comes
    rec.wait("a")
    assert short.stats.solo_starts == 1
    assert (short.stats.arrivals.waits, short.stats.arrivals.given_up) == (1, 1)


def test_a_resumed_seeded_sampled_request_draws_what_the_uncut_run_drew(model):
    """A heir that replays a cut stream's tokens continues a seeded sampled answer with the
    tokens the uncut run drew, alone and inside a batch (each path draws once a token)."""
    from dataclasses import replace

    opts = {"temperature": 1.5, "seed": 11, "num_predict": 14}
    rec = Recorder()
    loop = _loop(model)
    _run(loop)

    def job(name: str, resume=None) -> Job:
        j = rec.job(name, PROMPTS[2], 14)
        j.request = replace(j.request, options=dict(opts), resume=resume)
        return j

    loop.submit(job("uncut"))
    rec.wait("uncut")
    uncut = _ids(rec, "uncut")
    assert len(uncut) == 14
    loop.submit(job("reseeded"))
    rec.wait("reseeded")
    assert _ids(rec, "reseeded") == uncut, "a seed does not fix the sampled tokens"

    loop.submit(job("heir alone", resume=uncut[:5]))
    rec.wait("heir alone")
    assert _ids(rec, "heir alone") == uncut[5:]

    loop.submit(rec.job("other", PROMPTS[3], 40))
    while not _ids(rec, "other"):
        rec.done["other"].wait(0.005)
    loop.submit(job("heir batched", resume=uncut[:8]))
    rec.wait("heir batched", "other")
    assert loop.stats.batch_inserts, "the heir did not join a batch"
    assert _ids(rec, "heir batched") == uncut[8:]


class _Faulty(BatchLoop):
    """Injects a fault: a request whose prompt says BOOM raises in its logits processor a few
    tokens in, as a bug in a sampler or processor would."""

    def _prepare(self, job):
        a = super()._prepare(job)
        if a is not None and "BOOM" in job.request.prompt:
            seen = []

            def boom(tokens, logits):
                seen.append(1)
                if len(seen) > 3 or "BROKEN" in job.request.prompt:
                    raise RuntimeError("injected fault")
                return logits

            a.processors.append(boom)
        return a


def test_a_step_that_raises_fails_its_streams_and_the_loop_serves_on(model):
    from hippod.engine.batch_loop import MAX_FAILED_STEPS

    m, tok = model
    loop = _Faulty(m, tok, num_parallel=8, context_length=2048, info=lambda n: None)
    ended: list[Exception] = []

    def serve() -> None:
        try:
            loop.run_forever()
        except RuntimeError as e:  # in a runner, the process ends here
            ended.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    rec = Recorder()

    def failed(name: str) -> ErrorEvent:
        assert rec.done[name].wait(120), f"{name} did not finish"
        final = [ev for n, ev in rec.events if n == name][-1]
        assert isinstance(final, ErrorEvent) and final.status == 500, final
        return final

    loop.submit(rec.job("alone", "BOOM goes the solo stream", 12))  # on the solo path
    assert "injected fault" in failed("alone").message
    loop.submit(rec.job("after solo", PROMPTS[0], 6))
    rec.wait("after solo")

    loop.submit(rec.job("long", PROMPTS[1], 200))
    while not rec.tokens("long"):
        rec.done["long"].wait(0.005)
    loop.submit(rec.job("bad", "BOOM in a batch", 12))  # joins the long one in the batch
    failed("bad")
    failed("long")  # the batch's step failed under both: both are told
    loop.submit(rec.job("after batch", PROMPTS[2], 6))
    loop.submit(rec.job("and beside it", PROMPTS[3], 6))
    rec.wait("after batch", "and beside it")
    assert len(rec.tokens("after batch")) == 6
    # Steps that fail every time, with no step between them that did not, are no request's
    # fault: the loop gives up (the runner exits, and the daemon starts a new one).
    for i in range(MAX_FAILED_STEPS):
        loop.submit(rec.job(f"again {i}", "BOOM BROKEN", 12))
        failed(f"again {i}")
    assert thread.is_alive()
    loop.submit(rec.job("last straw", "BOOM BROKEN", 12))
    thread.join(60)
    assert not thread.is_alive() and "injected fault" in str(ended[0])
