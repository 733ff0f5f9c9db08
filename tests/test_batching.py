"""Continuous batching, the prompt cache and speculative decoding, through a real hippod.

Greedy output is the contract: joining a batch mid-stream, reusing a cached prefix or drafting
with a smaller model must never change a single token.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

import openai
import pytest

from tests.modelfiles import make_tiny_llama

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("batching")
    return {"target": make_tiny_llama(base / "target", num_layers=4, seed=11),
            "draft": make_tiny_llama(base / "draft", num_layers=1, seed=11)}


def _create(d, name, path, **extra):
    status, body = d.request("POST", "/api/create", {"model": name, "from": str(path),
                                                     "stream": False, **extra})
    assert status == 200, body


def _generate(d, prompt, **options):
    status, body = d.request("POST", "/api/generate", {
        "model": "target", "prompt": prompt, "raw": True, "stream": False,
        "options": {**GREEDY, **options}})
    assert status == 200, body
    return body


def _stream_lines(d, prompt, num_predict):
    req = urllib.request.Request(d.url + "/api/generate", json.dumps({
        "model": "target", "prompt": prompt, "raw": True,
        "options": {"temperature": 0, "num_predict": num_predict}}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return [json.loads(line) for line in r]


def test_joining_a_running_stream_keeps_greedy_output(daemon_factory, tiny_dirs):
    d = daemon_factory("batch", env={"HIPPO_NUM_PARALLEL": "4"})
    _create(d, "target", tiny_dirs["target"])
    prompts = ["alpha beta gamma", "one two three four", "red green blue", "x y z"]
    alone = [_generate(d, p, num_predict=40)["response"] for p in prompts]
    # Now the first stream decodes alone, and the others arrive while it runs: it moves into
    # the batch with its KV cache, and every answer must match its solo answer.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(_stream_lines, d, prompts[0], 40)
        time.sleep(0.3)
        rest = [pool.submit(_generate, d, p, num_predict=40) for p in prompts[1:]]
        lines = first.result()
        together = ["".join(x.get("response", "") for x in lines)] + [f.result()["response"] for f in rest]
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 40
    assert together == alone


def test_a_burst_of_eight_keeps_greedy_output(daemon_factory, tiny_dirs):
    d = daemon_factory("burst", env={"HIPPO_NUM_PARALLEL": "8"})
    _create(d, "target", tiny_dirs["target"])
    prompts = [f"{w} went down to the {w}" for w in
               ("sea", "hill", "town", "farm", "mill", "wood", "lake", "road")]
    alone = [_generate(d, p, num_predict=16)["response"] for p in prompts]
    # Eight at once: however the runner groups them into prefills, no token may change.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _generate(d, p, num_predict=16)["response"], prompts))
    assert together == alone


def test_prompt_cache_reuses_the_previous_turn(daemon_factory, tiny_dirs):
    d = daemon_factory("cache")
    _create(d, "target", tiny_dirs["target"])
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="x")
    history = [{"role": "system", "content": "You are a terse assistant. " * 8},
               {"role": "user", "content": "Say something."}]
    first = client.chat.completions.create(model="target", messages=history, max_tokens=8,
                                           temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And again."}]
    second = client.chat.completions.create(model="target", messages=history, max_tokens=8,
                                            temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 2, (cached, first.usage.prompt_tokens)
    # The same request twice: the answer does not depend on the cache.
    again = client.chat.completions.create(model="target", messages=history, max_tokens=8,
                                           temperature=0)
    assert again.choices[0].message.content == second.choices[0].message.content


def test_speculative_decoding_never_changes_greedy_output(daemon_factory, tiny_dirs):
    plain = daemon_factory("plain")
    _create(plain, "target", tiny_dirs["target"])
    expected = [_generate(plain, p)["response"] for p in ("hello world", "the quick brown fox")]
    plain.stop()

    # A separate draft model, named at create time.
    d = daemon_factory("draft", env={"HIPPO_DRAFT_POLICY": "always"})
    _create(d, "draft-model", tiny_dirs["draft"])
    _create(d, "target", tiny_dirs["target"], draft="draft-model")
    got = [_generate(d, p) for p in ("hello world", "the quick brown fox")]
    assert [g["response"] for g in got] == expected
    assert all(g["draft_count"] > 0 for g in got), got
    assert all(0 <= g["draft_accepted_count"] <= g["draft_count"] for g in got)
    d.stop()

    # The target's own first layer as the draft.
    s = daemon_factory("self", env={"HIPPO_SELF_DRAFT_LAYERS": "1", "HIPPO_DRAFT_POLICY": "always"})
    _create(s, "target", tiny_dirs["target"])
    got = [_generate(s, p) for p in ("hello world", "the quick brown fox")]
    assert [g["response"] for g in got] == expected
    assert all(g["draft_count"] > 0 for g in got)


def test_create_rejects_a_bad_draft_name(daemon_factory, tiny_dirs):
    d = daemon_factory("baddraft")
    status, body = d.request("POST", "/api/create", {"model": "target", "from": str(tiny_dirs["target"]),
                                                     "draft": "../etc", "stream": False})
    assert status == 400 and "invalid model name" in body["error"]


def test_requests_waiting_for_the_load_start_as_one_batch(daemon_factory, tiny_dirs):
    """Eight requests that arrive while their model loads reach the runner one connection each,
    a little apart; the daemon's numbers tell the runner to take them in one insert (one batched
    prefill), and a later lone request still starts alone."""
    d = daemon_factory("together", env={"HIPPO_NUM_PARALLEL": "8"})
    _create(d, "target", tiny_dirs["target"])
    prompts = [f"{w} went up the {w}" for w in ("hill", "stair", "tree", "tower", "ramp", "rope", "cliff", "mast")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _generate(d, p, num_predict=8)["response"], prompts))
    stats = d.admission()
    assert stats["numbered"] == 8, stats  # the daemon numbered every request it sent this runner
    stalled = stats["given_up"] > 0  # a loaded machine kept some past the runner's hold (25 ms)
    assert (stats["batch_inserts"] == [8] and stats["solo_starts"] == 0) or stalled, stats
    _generate(d, "alone at last", num_predict=4)
    after = d.admission()
    assert after["solo_starts"] == stats["solo_starts"] + 1 and after["numbered"] == 9, after
    assert after["batch_inserts"] == stats["batch_inserts"] and after["held"] == stats["held"], after
    assert together == [_generate(d, p, num_predict=8)["response"] for p in prompts]
