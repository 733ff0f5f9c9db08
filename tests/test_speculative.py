"""Speculative decoding is lossless in every mode, through a real hippod and real runners.

The target is a tiny random llama whose layers after the second are damped toward identity, so
its own first two layers (the self-draft), a copy of them saved as a separate draft model, and
a random DFlash draft agree with it often, rarely, and never: every path of the accept/reject
code runs, and greedy output must equal plain decoding token for token. The rejection sampler
is checked against the exact distribution on a toy vocabulary.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import mlx.core as mx
import pytest

from tests.modelfiles import make_tiny_llama, write_random_dflash

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 16}
PROMPTS = ("the quick brown fox", "one two three four five")


def _damped_copy(src, dst, start: int, epsilon: float):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from hippod.engine.drafts import damp_layers

    model, _ = load(str(src))
    damp_layers(model, start, epsilon)
    shutil.copytree(src, dst)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("speculative")
    raw = make_tiny_llama(base / "raw", num_layers=4, seed=11)
    target = _damped_copy(raw, base / "target", 2, 0.15)
    # The target's first two layers as a model of their own: a draft that often agrees.
    cfg = json.loads((target / "config.json").read_text())
    draft = _truncated(target, base / "draft", cfg, 2)
    dflash = write_random_dflash(base / "dflash", cfg, num_layers=1, block_size=5, mask_token_id=3)
    return {"target": target, "draft": draft, "dflash": dflash, "config": cfg}


def _truncated(src, dst, cfg, layers: int):
    shutil.copytree(src, dst)
    weights = mx.load(str(src / "model.safetensors"))
    keep = {k: v for k, v in weights.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    mx.save_safetensors(str(dst / "model.safetensors"), keep, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    return dst


def _create(d, name, path, **extra):
    status, body = d.request("POST", "/api/create", {"model": name, "from": str(path),
                                                     "stream": False, **extra})
    assert status == 200, body


def _generate(d, model, prompt, **options):
    status, body = d.request("POST", "/api/generate", {
        "model": model, "prompt": prompt, "raw": True, "stream": False,
        "options": {**GREEDY, **options}})
    assert status == 200, body
    return body


def _chat(d, model, messages):
    status, body = d.request("POST", "/api/chat", {"model": model, "messages": messages,
                                                   "stream": False, "options": GREEDY})
    assert status == 200, body
    return body


def test_greedy_output_is_plain_output_for_draft_model_and_dflash(daemon_factory, dirs):
    d = daemon_factory("spec", env={"HIPPO_NUM_DRAFT": "4", "HIPPO_DRAFT_POLICY": "always"})  # every request drafts
    _create(d, "plain", dirs["target"])
    _create(d, "draft-model", dirs["draft"])
    _create(d, "drafted", dirs["target"], draft="draft-model")
    _create(d, "flash", dirs["target"], draft=str(dirs["dflash"]))  # a DFlash directory
    expected = [_generate(d, "plain", p)["response"] for p in PROMPTS]
    for model in ("drafted", "flash"):
        got = [_generate(d, model, p) for p in PROMPTS]
        assert [g["response"] for g in got] == expected, model
        assert all(g["draft_count"] > 0 for g in got), (model, got)
        assert all(0 <= g["draft_accepted_count"] <= g["draft_count"] for g in got)
    drafted = [_generate(d, "drafted", p) for p in PROMPTS]
    assert sum(g["draft_accepted_count"] for g in drafted) > 0  # the accept path ran too

    # A second turn reuses the first turn's KV (target's and draft's) from the prompt cache.
    for model in ("plain", "drafted", "flash"):
        first = [{"role": "user", "content": "Count with me."}]
        answer = _chat(d, model, first)["message"]["content"]
        second = _chat(d, model, first + [{"role": "assistant", "content": answer},
                                          {"role": "user", "content": "Again."}])
        if model == "plain":
            plain_turns = (answer, second["message"]["content"])
        else:
            assert (answer, second["message"]["content"]) == plain_turns, model
            assert second["prompt_eval_count"] > 0

    # A repetition penalty is applied at every drafted position just as in plain decoding.
    penalised = _generate(d, "plain", PROMPTS[0], repeat_penalty=1.5)["response"]
    assert _generate(d, "drafted", PROMPTS[0], repeat_penalty=1.5)["response"] == penalised
    assert _generate(d, "flash", PROMPTS[0], repeat_penalty=1.5)["response"] == penalised

    # Sampled decoding speculates too (its distribution is the target's: see the unit test).
    sampled = _generate(d, "drafted", PROMPTS[0], temperature=0.8, seed=3)
    assert sampled["eval_count"] == 16 and sampled["draft_count"] > 0

    # Two at once: the long one drafts alone, joins the batch (no drafting there), and drafts
    # again once the short one is done; its answer is still the plain one.
    long_alone = _generate(d, "plain", PROMPTS[1], num_predict=64)["response"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(_generate, d, "drafted", PROMPTS[1], num_predict=64)
        time.sleep(0.1)
        short = pool.submit(_generate, d, "drafted", PROMPTS[0], num_predict=3)
        assert long.result()["response"] == long_alone
        assert short.result()["eval_count"] == 3

    # /metrics counts what was drafted and kept, per model.
    status, text = d.request("GET", "/metrics")
    assert status == 200
    drafted = _sample(text, 'hippo_speculative_drafted_tokens_total{model="drafted:latest"}')
    accepted = _sample(text, 'hippo_speculative_accepted_tokens_total{model="drafted:latest"}')
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    assert _sample(text, 'hippo_speculative_drafted_tokens_total{model="flash:latest"}') > 0
    assert 'hippo_speculative_drafted_tokens_total{model="plain:latest"}' not in text


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_greedy_output_is_plain_output_for_self_draft(daemon_factory, dirs):
    plain = daemon_factory("plain")
    _create(plain, "target", dirs["target"])
    expected = [_generate(plain, "target", p)["response"] for p in PROMPTS]
    plain.stop()
    s = daemon_factory("self", env={"HIPPO_SELF_DRAFT_LAYERS": "2"})
    _create(s, "target", dirs["target"])
    got = [_generate(s, "target", p) for p in PROMPTS]
    assert [g["response"] for g in got] == expected
    assert sum(g["draft_accepted_count"] for g in got) > 0


def test_a_dflash_draft_that_does_not_fit_its_target_is_refused(daemon_factory, dirs, tmp_path):
    bad = write_random_dflash(tmp_path / "bad", {**dirs["config"], "num_hidden_layers": 9},
                              block_size=4, target_layer_ids=[1, 8])
    d = daemon_factory("bad")
    _create(d, "flash", dirs["target"], draft=str(bad))
    status, body = d.request("POST", "/api/generate", {"model": "flash", "prompt": "hi",
                                                       "stream": False})
    assert status == 500 and "9 target layers" in body["error"], body
    status, body = d.request("POST", "/api/generate", {"model": "flash-draft", "prompt": "hi",
                                                       "stream": False})
    assert status == 500 and "DFlash draft" in body["error"], body
    status, body = d.request("POST", "/api/create", {"model": "other", "from": str(dirs["target"]),
                                                     "draft": str(tmp_path / "nowhere"), "stream": False})
    assert status == 400 and "nowhere: no such file or directory" in body["error"], body


# -- pure functions, fast ------------------------------------------------------------------------


def test_rejection_sampling_keeps_the_target_distribution():
    """Draft from q, accept/reject against p: the first token out is distributed as p."""
    from hippod.engine.speculative import accept_sampled

    p = mx.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = mx.array([[0.1, 0.1, 0.1, 0.7]])
    counts = [0, 0, 0, 0]
    accepted_total = 0
    key = mx.random.key(7)
    trials = 4000
    for _ in range(trials):
        key, k1, k2 = mx.random.split(key, 3)
        draft = int(mx.random.categorical(mx.log(q[0]), key=k1))
        accepted, token = accept_sampled([draft], p, q, k2)
        first = draft if accepted else token
        counts[first] += 1
        accepted_total += accepted
    freq = [c / trials for c in counts]
    for f, want in zip(freq, p[0].tolist()):
        assert abs(f - want) < 0.03, (freq, p[0].tolist())
    # Acceptance is sum(min(p, q)) = 0.1 + 0.1 + 0.1 + 0.05 = 0.35.
    assert abs(accepted_total / trials - 0.35) < 0.03


def test_a_deterministic_draft_is_accepted_with_the_target_probability():
    from hippod.engine.speculative import accept_sampled

    p = mx.array([[0.6, 0.4], [0.5, 0.5]])
    key = mx.random.key(1)
    firsts = []
    for _ in range(2000):
        key, sub = mx.random.split(key)
        accepted, token = accept_sampled([0], p, None, sub)
        firsts.append(0 if accepted else token)
    assert abs(firsts.count(0) / 2000 - 0.6) < 0.04
    assert abs(firsts.count(1) / 2000 - 0.4) < 0.04


def test_greedy_acceptance_is_the_agreeing_prefix():
    from hippod.engine.speculative import accept_greedy

    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == 2
    assert accept_greedy([5, 6, 7], [5, 6, 7, 1]) == 3
    assert accept_greedy([4], [5, 1]) == 0
    assert accept_greedy([], [5]) == 0


def test_a_lone_sequence_drafts_again_only_when_the_measured_costs_repay_the_draft_prefill():
    from hippod.engine.draft_policy import DraftPolicy
    from hippod.engine.speculative import ResumeCosts

    costs, policy = ResumeCosts(), DraftPolicy(3)
    assert policy.token_seconds() is None
    assert costs.pays(4000, 16, policy.token_seconds())  # nothing measured yet: it resumes, and so measures
    costs.record_step(2, 0.030)
    costs.record_step(1, 0.020)  # a one-sequence batch step: 20 ms a token
    costs.record_prefill(1000, 0.5)  # the draft reads 2000 tokens a second
    # drafting at 10 ms a token saves 10 ms per token: 200 tokens left repay reading 1000
    # tokens (0.5 s), 20 do not; a short context is cheap to read
    assert costs.pays(1000, 200, 0.010) and not costs.pays(1000, 20, 0.010)
    assert costs.pays(100, 20, 0.010)
    assert not costs.pays(10, 10_000, 0.025)  # drafting slower than a batch step never pays
    assert costs.as_dict()["step_seconds"] == {1: 0.020, 2: 0.030}
    # The drafting side is the runner's policy: its best k's predicted seconds per token.
    policy.t_plain, policy.t_round, policy.kept, policy.tried = 0.020, {3: 0.030}, 9.0, 10.0
    k, rate = policy.best()
    assert policy.token_seconds() == pytest.approx(policy.seconds(k) / policy.tokens(k)) == pytest.approx(1 / rate)
    assert 0.005 < policy.token_seconds() < 0.020  # 3.4 tokens a 30 ms round
    policy.kept = 0.0  # drafts stop being kept: a round yields one token, slower than plain
    assert policy.token_seconds() > 0.020 and not costs.pays(10, 10_000, policy.token_seconds())


def test_the_catalog_names_dflash_drafts_for_qwen3_and_llama():
    from hippod.registry.catalog import resolve

    assert resolve("qwen3-4b", "latest").dflash == "z-lab/Qwen3-4B-DFlash-b16"
    assert resolve("qwen3-8b", "8bit").dflash == "z-lab/Qwen3-8B-DFlash-b16"  # variants inherit it
    assert resolve("llama-3.1-8b", "latest").dflash == "z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat"
    assert resolve("qwen3-0.6b", "latest").dflash is None


def test_dflash_context_follows_the_target_when_drafts_are_kept(dirs, tmp_path):
    """In-process: DFlash drafts replaced by the target's own continuation (so they are kept)
    still give plain output, and the draft's context rows stay one per token the target holds."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from hippod.engine.dflash import DFlashError, load_dflash
    from hippod.engine.speculative import Decoding, Stats, speculative_stream

    model, tok = load(str(dirs["target"]))
    prompt = tok.encode("alpha beta gamma delta")
    plain = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=20)]
    draft = load_dflash(dirs["dflash"], model)

    class Kept:
        def __init__(self, inner):
            self.inner, self.taps = inner, inner.taps

        def prefill(self, tokens, features):
            self.inner.prefill(tokens, features)

        def propose(self, pending, n, history, decoding):
            guess, _ = self.inner.propose(pending, n, history, decoding)
            at = len(history) - len(prompt)
            right = (plain[at:at + guess.shape[0]] + [0] * n)[:guess.shape[0]]
            if at % 3 == 2:  # now and then a wrong guess
                right[-1] = (right[-1] + 1) % 49152
            return mx.array(right, mx.uint32), None

        def commit(self, drafts, accepted, features):
            self.inner.commit(drafts, accepted, features)

    target_cache, draft_cache = make_prompt_cache(model), draft.make_cache()
    stats = Stats()
    out = [t for t, _ in speculative_stream(model, Kept(draft.proposer(draft_cache)), target_cache, prompt,
                                            max_tokens=20, num_draft=4, decoding=Decoding(), stats=stats)]
    assert out == plain
    assert stats.accepted > 10
    assert draft_cache[0].offset == target_cache[0].offset

    # A checkpoint may carry the target's embeddings (ignored); one that lacks a weight is refused.
    weights = mx.load(str(dirs["dflash"] / "model.safetensors"))
    broken = shutil.copytree(dirs["dflash"], tmp_path / "broken")
    extra = {**weights, "embed_tokens.weight": mx.zeros((4, 4))}
    mx.save_safetensors(str(broken / "model.safetensors"), extra)
    load_dflash(broken, model)
    weights.pop("layers.0.mlp.up_proj.weight")
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    with pytest.raises(DFlashError, match="lacks 1 weights"):
        load_dflash(broken, model)


def test_plain_rounds_between_drafting_rounds_keep_plain_output_and_a_coherent_cache(dirs):
    """In-process: drafting on and off round by round, as the policy does it. Pipelined plain
    rounds in a row, a draft model catching up on the tokens it missed, and a consumer that
    stops early: the tokens are the plain ones, and the target's cache holds only tokens the
    consumer has seen."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from hippod.engine.drafts import ModelDrafter
    from hippod.engine.speculative import Decoding, Stats, speculative_stream, trim_to

    model, tok = load(str(dirs["target"]))
    drafter = ModelDrafter(load(str(dirs["draft"]))[0])
    prompt = tok.encode("one two three four five")
    plain = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=40)]
    pattern = iter([3, 0, 0, 0, 2, 0, 3, 3, 0, 0, 0, 0, 1] * 10)
    target_cache, draft_cache = make_prompt_cache(model), drafter.make_cache()
    stats = Stats()
    stream = speculative_stream(model, drafter.proposer(draft_cache), target_cache, prompt, max_tokens=40,
                                num_draft=lambda: next(pattern), decoding=Decoding(), stats=stats)
    seen = []
    for token, _ in stream:
        seen.append(token)
        if len(seen) == 33:
            break
    stream.close()
    assert seen == plain[:33]
    assert stats.drafted > 0 and stats.accepted > 0
    total = len(prompt) + len(seen)
    assert total - 1 <= target_cache[0].offset <= total + 3  # at most the rest of a drafting round
    # What it holds is the right KV: plain decoding goes on from it with the plain tokens.
    trim_to(target_cache, total - 1)
    rest = [int(t) for t, _ in generate_step(mx.array(seen[-1:]), model, max_tokens=7, prompt_cache=target_cache)]
    assert rest == plain[33:]

    # A draft model that sat out plain rounds reads their tokens before it drafts again.
    cache = drafter.make_cache()
    proposer = drafter.proposer(cache)
    proposer.prefill(prompt[:-1], None)
    history = prompt + plain[:5]  # five tokens the target produced without it
    proposer.propose(history[-1], 1, history, Decoding())
    assert cache[0].offset == len(history)  # all of history, the pending token included
