"""Pipeline parallelism (issue 6): one model's layers over several runners joined by MLX's ring.

Planner unit tests; runner-level tests over loopback (SmolLM2 split 15/15, and tiny random
qwen3 and gemma3 models split three ways, each token-identical to the model on one runner);
daemon-level tests on two network namespaces joined by a veth pair: a forced split and an
automatic one (chosen by the memory budgets), both token-identical to one node, and a link
that drops mid-generation.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from hippod.cluster import planner
from hippod.cluster.splits import LOST_AFTER, PING_TIMEOUT, files_for_layers, model_parts
from hippod.protocol import DoneEvent, GenerateRequest, TokenEvent
from hippod.registry.modelinfo import inspect_model_dir
from hippod.runner_process import RunnerError, RunnerProcess
from tests.daemon import free_port
from tests.modelfiles import TOKENIZER_FILES, smollm2_mlx_dir

SLOW = pytest.mark.slow
NETNS = [pytest.mark.netns, pytest.mark.slow]
MB = 1_000_000


# -- the planner ------------------------------------------------------------------------------


def parts(n=30, layer=4 * MB, first=30 * MB, last=30 * MB, overhead=150 * MB) -> planner.ModelParts:
    return planner.ModelParts(tuple([layer] * n), first, last, overhead)


def counts(shares) -> list[int]:
    return [s.end - s.start for s in shares]


def test_equal_budgets_split_evenly_and_contiguously():
    shares = planner.plan([planner.Node("a", 1000 * MB), planner.Node("b", 1000 * MB)], parts())
    assert counts(shares) == [15, 15]
    assert (shares[0].start, shares[0].end, shares[1].start, shares[1].end) == (0, 15, 15, 30)
    assert shares[0].bytes == 150 * MB + 30 * MB + 15 * 4 * MB  # overhead + embeddings + layers
    assert shares[1].bytes == 150 * MB + 30 * MB + 15 * 4 * MB  # overhead + head + layers


def test_layers_follow_the_free_memory():
    # Room beyond the fixed costs: 60 MB vs 120 MB -> one third and two thirds of the layers.
    shares = planner.plan([planner.Node("a", 240 * MB), planner.Node("b", 300 * MB)], parts())
    assert counts(shares) == [10, 20]
    three = planner.plan([planner.Node(x, 260 * MB) for x in "abc"],
                         parts(overhead=100 * MB, first=20 * MB, last=20 * MB))
    assert sum(counts(three)) == 30 and max(counts(three)) - min(counts(three)) <= 2
    assert [s.start for s in three] == [0, three[0].end, three[1].end]


def test_every_node_gets_a_layer_and_tight_plans_are_repaired():
    # b can hold only its fixed costs and one layer: proportional would give it none.
    shares = planner.plan([planner.Node("a", 1000 * MB), planner.Node("b", 184 * MB)], parts())
    assert counts(shares) == [29, 1]
    # Rounding to the nearest boundary overfills a, so the plan is filled in order instead.
    tight = parts(n=3, layer=10 * MB, first=0, last=0, overhead=0)
    shares = planner.plan([planner.Node("a", 15 * MB), planner.Node("b", 25 * MB)], tight)
    assert counts(shares) == [1, 2] and all(s.bytes <= f for s, f in zip(shares, (15 * MB, 25 * MB)))


def test_refusal_says_what_was_needed_and_what_was_free():
    with pytest.raises(planner.PlanRefused) as e:
        planner.plan([planner.Node("alpha", 200 * MB), planner.Node("beta", 250 * MB)], parts(), "model 'big'")
    message = str(e.value)
    assert e.value.needed == 30 * 4 * MB + 60 * MB + 2 * 150 * MB and e.value.available == 450 * MB
    assert "model 'big' needs 480.0 MB (480000000 bytes)" in message
    assert "alpha 200.0 MB" in message and "beta 250.0 MB" in message and "450.0 MB" in message
    with pytest.raises(planner.PlanRefused, match="too few"):
        planner.plan([planner.Node(str(i), 10**12) for i in range(4)], parts(n=3))


def test_auto_plan_uses_the_fewest_nodes_biggest_first():
    local = planner.Node("me", 250 * MB)
    peers = [planner.Node("small", 200 * MB), planner.Node("big", 900 * MB), planner.Node("mid", 400 * MB)]
    shares = planner.plan_auto(local, peers, parts())
    assert [s.node for s in shares] == ["me", "big"]
    shares = planner.plan_auto(local, [planner.Node("p", 220 * MB), planner.Node("q", 220 * MB)], parts())
    assert [s.node for s in shares] == ["me", "p", "q"]
    with pytest.raises(planner.PlanRefused, match="no trusted peer"):
        planner.plan_auto(local, [], parts())


def test_model_parts_of_smollm2_and_the_files_a_rank_needs():
    d = smollm2_mlx_dir()
    details = inspect_model_dir(d).as_details()
    p = model_parts(d, details, 1024)
    kv = 2 * 3 * 64 * 1024 * 2
    assert len(p.layers) == 30 and len(set(p.layers)) == 1 and p.layers[0] > kv
    assert p.first > 30 * MB  # the 8-bit embeddings
    assert p.last > p.first  # tied: the head needs the embeddings too, plus the final norm
    assert sum(p.layers) - 30 * kv + p.last == details["weights_bytes"]  # layers, embeddings, final norm
    files = [{"name": n, "sha256": "0" * 64, "size": 1} for n in
             ("config.json", "a.safetensors", "b.safetensors", "tokenizer.json")]
    index = {"weight_map": {"model.embed_tokens.weight": "a.safetensors", "model.layers.0.x": "a.safetensors",
                            "model.layers.1.x": "b.safetensors", "model.norm.weight": "b.safetensors",
                            "lm_head.weight": "b.safetensors"}}
    names = lambda fs: sorted(f["name"] for f in fs)  # noqa: E731
    assert names(files_for_layers(files, index, 0, 1, True, False)) == ["a.safetensors", "config.json",
                                                                        "tokenizer.json"]
    assert names(files_for_layers(files, index, 1, 2, False, True)) == ["b.safetensors", "config.json",
                                                                        "tokenizer.json"]
    assert len(files_for_layers(files, None, 1, 2, False, True)) == 4  # no index: every file


def test_split_records_are_checked_in_one_place():
    from hippod.protocol import (LayerRange, SplitPrepare, SplitRecordError, SplitRef, SplitStart,
                                 decode_split, split_body)

    good = {"split": "a1b2c3", "model": "smol:latest", "digest": "ab" * 32, "layers": [15, 30],
            "rank": 1, "world": 2, "bytes": 5 * MB}
    record = decode_split(SplitPrepare, good)
    assert record.layers == LayerRange(15, 30) and str(record.layers) == "15-29" and 20 in record.layers
    assert split_body(record) == good and LayerRange.parse(record.layers.arg()) == record.layers
    bad = [({"layers": [3, 3]}, "layers"), ({"layers": [1, 2, 3]}, "layers"), ({"layers": [True, 2]}, "layers"),
           ({"rank": 2}, "rank"), ({"rank": "1"}, "rank"), ({"bytes": 1e400}, "bytes"), ({"split": "../up"}, "split"),
           ({"digest": "not-hex"}, "digest"), ({"model": None}, "model"), ({"context_length": 0}, "context_length")]
    for change, param in bad:
        with pytest.raises(SplitRecordError) as e:
            decode_split(SplitPrepare, {**good, **change})
        assert e.value.param == param, (change, e.value)
    assert decode_split(SplitStart, {"split": "x", "hosts": [["10.0.0.1:5000"], ["[fe80::1]:6000"]]}).hosts
    for hosts in ([], [["10.0.0.1"]], [["a b:1"]], [[1]], "10.0.0.1:5"):
        with pytest.raises(SplitRecordError, match="hosts"):
            decode_split(SplitStart, {"split": "x", "hosts": hosts})
    with pytest.raises(SplitRecordError, match="object"):
        decode_split(SplitRef, ["x"])
    with pytest.raises(ValueError, match="bad layer range"):
        LayerRange.parse("7")


# -- runners over loopback --------------------------------------------------------------------


async def _generate(runner: RunnerProcess, request: GenerateRequest) -> tuple[list[int], str, DoneEvent]:
    tokens, text, done = [], "", None
    async for ev in runner.generate(request):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
            text += ev.text
        else:
            done = ev
    return tokens, text, done


def _runner(model_dir: Path, tmp: Path, **kw) -> RunnerProcess:
    return RunnerProcess(model_dir, tmp, tmp / "runners.log", context_length=4096, **kw)


def _split(model_dir: Path, tmp: Path, bounds: list[int], num_parallel: int = 1) -> list[RunnerProcess]:
    world = len(bounds) - 1
    hostfile = tmp / f"hosts-{time.monotonic_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(world)]))
    return [_runner(model_dir, tmp, num_parallel=num_parallel, extra_env={"MLX_HOSTFILE": str(hostfile)},
                    extra_args=["--layers", f"{bounds[r]}:{bounds[r + 1]}", "--rank", str(r), "--world", str(world)])
            for r in range(world)]


async def _outputs(runner: RunnerProcess, requests: list[GenerateRequest]) -> list[tuple]:
    return [await _generate(runner, r) for r in requests]


def _requests(n: int, long: bool = False) -> list[GenerateRequest]:
    requests = [GenerateRequest(prompt="The capital of France is", raw=True,
                                options={"temperature": 0, "num_predict": n}),
                GenerateRequest(messages=[{"role": "user", "content": "Name three colors."}],
                                options={"temperature": 0, "num_predict": n})]
    if long:  # more than one prefill chunk (2048 tokens): masks then depend on the caches' offsets
        requests.append(GenerateRequest(prompt="one two three four " * 600, raw=True,
                                        options={"temperature": 0, "num_predict": n, "num_ctx": 4096}))
    return requests


def compare_split_with_one(model_dir: Path, tmp: Path, bounds: list[int], n: int = 8, long: bool = False) -> dict:
    async def main():
        one = _runner(model_dir, tmp, num_parallel=2)
        ready_one = await one.start(120)
        try:
            expected = await _outputs(one, _requests(n, long))
        finally:
            await one.kill()
        ranks = _split(model_dir, tmp, bounds)
        try:
            ready = await asyncio.gather(*(r.start(120) for r in ranks))
            got = await _outputs(ranks[0], _requests(n, long))
            # Two at once: the second waits for the first (a split decodes one sequence at a
            # time), and each request starts every rank's cache afresh.
            again = await asyncio.gather(*(_generate(ranks[0], r) for r in _requests(n)))
            idle_cpu = _cpu_seconds(ranks[1:], 2.0)
            return {"expected": expected, "got": got, "again": again, "ready_one": ready_one,
                    "ready": ready, "idle_cpu": idle_cpu, "ranks": ranks}
        finally:
            for r in ranks:
                await r.kill()

    return asyncio.run(main())


def _cpu_seconds(runners: list[RunnerProcess], seconds: float) -> float:
    """CPU the runners use in `seconds`, counted from half a second after the call: the tail of
    the work just answered (freeing the sequence's KV, the last send) is not idling."""
    procs = [psutil.Process(r.pid) for r in runners]
    time.sleep(0.5)
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)
    return sum(sum(p.cpu_times()[:2]) for p in procs) - before


@SLOW
def test_smollm2_split_15_15_is_token_identical_to_one_runner(tmp_path):
    r = compare_split_with_one(smollm2_mlx_dir(), tmp_path, [0, 15, 30], n=10)
    for (tokens, text, done), (want_tokens, want_text, want_done) in zip(r["got"], r["expected"]):
        assert tokens == want_tokens and text == want_text and tokens
        assert done.completion_tokens == want_done.completion_tokens
    assert [x[0] for x in r["again"]] == [x[0] for x in r["expected"]]
    # Each rank read only its own tensors: 15 layers and the (tied) embeddings, not the model.
    whole = r["ready_one"].mlx_active_bytes
    assert all(x.mlx_active_bytes < 0.75 * whole for x in r["ready"]), (whole, r["ready"])
    # A rank waiting for work sleeps: the ring's busy-polling recv is only posted once data is there.
    assert r["idle_cpu"] < 0.3, f"an idle rank used {r['idle_cpu']:.2f}s of CPU in 2s"


@SLOW
def test_a_rank_that_dies_ends_the_stream(tmp_path):
    async def main():
        ranks = _split(smollm2_mlx_dir(), tmp_path, [0, 15, 30])
        try:
            await asyncio.gather(*(r.start(120) for r in ranks))
            request = GenerateRequest(prompt="Once upon a time", raw=True,
                                      options={"temperature": 0, "num_predict": 400})
            seen, killed_at = 0, None
            with pytest.raises(RunnerError) as e:
                async for ev in ranks[0].generate(request):
                    seen += 1
                    if seen == 2:
                        killed_at = time.monotonic()
                        ranks[1].proc.kill()
            took = time.monotonic() - killed_at
            await asyncio.wait_for(ranks[0].exited.wait(), 5)
            return took, str(e.value), ranks[0].exit_code
        finally:
            for r in ranks:
                await r.kill()

    took, message, code = asyncio.run(main())
    assert took < 5, took
    assert code == 3 and "stopped" in message, (code, message)


def _concurrent_requests(n: int) -> list[GenerateRequest]:
    """Prompts of different lengths (batched prefill pads them) and two with the same long
    system prompt (the second reuses the first's prompt cache on every rank)."""
    system = {"role": "system", "content": "You are a terse assistant who answers in one line. " * 4}
    return [*_requests(n),
            GenerateRequest(prompt="Once upon a time there was a", raw=True, options={"temperature": 0, "num_predict": n}),
            GenerateRequest(messages=[system, {"role": "user", "content": "Name a fruit."}],
                            options={"temperature": 0, "num_predict": n})]


@SLOW
def test_a_split_batches_concurrent_requests_with_one_runners_tokens(tmp_path):
    """Requests that arrive together share one batch through the ring, as on one runner: each
    rank keeps its layers' KV per sequence and follows the batch's rows as they come and go;
    a chat's next turns reuse the prompt cache on every rank, alone and batched."""
    system = {"role": "system", "content": "You are a terse assistant who answers in one line. " * 4}
    follow_ups = [GenerateRequest(messages=[system, {"role": "user", "content": q}],
                                  options={"temperature": 0, "num_predict": 6})
                  for q in ("Name a fruit.", "Name a color.", "Name a city.")]

    async def run(runner):
        together = await asyncio.gather(*(_generate(runner, r) for r in _concurrent_requests(8)))
        again = await asyncio.gather(*(_generate(runner, r) for r in follow_ups))
        alone = await _generate(runner, follow_ups[0])
        info = await runner.info()
        return together, again, alone, info

    async def main():
        model_dir = smollm2_mlx_dir()
        one = _runner(model_dir, tmp_path, num_parallel=4)
        ranks = _split(model_dir, tmp_path, [0, 15, 30], num_parallel=4)
        await asyncio.gather(one.start(120), *(r.start(120) for r in ranks))
        try:
            return await run(one), await run(ranks[0])
        finally:
            for r in (one, *ranks):
                await r.kill()

    (want, want_again, want_alone, _), (got, again, alone, info) = asyncio.run(main())
    assert [t for t, _, _ in got] == [t for t, _, _ in want] and all(t for t, _, _ in got), (got, want)
    assert [t for t, _, _ in again] == [t for t, _, _ in want_again], (again, want_again)
    assert alone[0] == want_alone[0]
    assert info.num_parallel == 4 and max(info.admission["batch_inserts"]) >= 2, info
    # A prompt seen before is found in the prompt cache on every rank, as on one runner.
    assert [d.cached_tokens for _, _, d in again] == [d.cached_tokens for _, _, d in want_again]
    assert again[0][2].cached_tokens >= again[0][2].prompt_tokens - 2, again[0][2]
    assert alone[2].cached_tokens >= alone[2].prompt_tokens - 2, alone[2]


def make_tiny(family: str, dst: Path, num_layers: int, seed: int = 0) -> Path:
    """A random-weight model of `family` (qwen3 untied, gemma3_text tied with sliding windows)
    that mlx_lm loads, with SmolLM2's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import gemma3_text, qwen3

    base = {"hidden_size": 64, "num_hidden_layers": num_layers, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
            "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 10000.0}
    if family == "qwen3":
        config = {**base, "model_type": "qwen3", "tie_word_embeddings": False}
        model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    else:
        config = {**base, "model_type": "gemma3_text", "sliding_window": 6, "sliding_window_pattern": 3,
                  "query_pre_attn_scalar": 16, "rope_local_base_freq": 10000.0}
        model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    for key, (name, p) in zip(keys, params):
        if family == "gemma3_text" and name == "lm_head.weight":
            continue  # tied
        if "norm" in name:  # gemma's norms scale by (1 + weight)
            value = mx.zeros(p.shape) if family == "gemma3_text" else mx.ones(p.shape)
        else:
            value = mx.random.normal(p.shape, key=key) * p.shape[-1] ** -0.5
        weights[name] = value.astype(mx.float16)
    model.update(tree_unflatten(list(weights.items())))
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copyfile(smollm2_mlx_dir() / name, dst / name)
    return dst


@SLOW
@pytest.mark.parametrize("family,bounds,long", [("qwen3", [0, 2, 5, 7], False), ("gemma3_text", [0, 2, 4, 7], True)])
def test_other_families_split_three_ways_token_identical(tmp_path, family, bounds, long):
    """The wrapper is generic: untied heads, and gemma3's scaled embeddings and sliding-window
    layers chosen by index, split at boundaries that cut its 3-layer pattern."""
    model_dir = make_tiny(family, tmp_path / family, num_layers=7)
    r = compare_split_with_one(model_dir, tmp_path, bounds, n=8, long=long)
    assert not long or r["expected"][2][2].prompt_tokens > 2048
    assert len(set(r["expected"][0][0])) >= 2, r["expected"]  # not a degenerate model
    for (tokens, _, _), (want, _, _) in zip(r["got"], r["expected"]):
        assert tokens == want
    assert r["again"][0][0] == r["expected"][0][0] and r["again"][1][0] == r["expected"][1][0]


# -- two daemons on a private LAN ---------------------------------------------------------------


def _cluster_helpers():
    from tests import test_cluster

    return test_cluster


class Pair:
    def __init__(self, net, root: Path, env_a: dict, env_b: dict):
        tc = _cluster_helpers()
        from hippod.cluster import trust

        secret = trust.new_secret()
        common = {"HIPPO_CLUSTER_SECRET": secret, "HIPPO_KEEP_ALIVE": "10m"}
        self.net = net
        self.a = tc.Node(net[0], root / "alpha", "alpha", {**common, **env_a})
        self.b = tc.Node(net[1], root / "beta", "beta", {**common, **env_b})

    def start(self, create_on: str = "a") -> "Pair":
        tc = _cluster_helpers()
        self.a.start()
        self.b.start()
        tc.wait_until(lambda: tc.trusted_and_fresh(self.a, self.b) and tc.trusted_and_fresh(self.b, self.a),
                      20, "both trust each other")
        status, body = getattr(self, create_on).call("POST", "/api/create", {
            "model": "smol", "from": str(smollm2_mlx_dir()), "stream": False})
        assert status == 200, body
        return self

    def stop(self) -> None:
        self.a.daemon.stop()
        self.b.daemon.stop()


def generate(node, n: int = 10, **extra) -> dict:
    status, body = node.call("POST", "/api/generate", {"prompt": "The capital of France is", **extra,
                                                       "model": "smol", "raw": True, "stream": False,
                                                       "options": {"temperature": 0, "num_predict": n}})
    assert status == 200, body
    return body


def chat(node, n: int = 10) -> str:
    status, body = node.call("POST", "/v1/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Name three colors."}],
        "max_tokens": n, "temperature": 0, "stream": False})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def together(node, n: int = 8) -> list[str]:
    """Four different prompts sent at once (they share the runner's batch), greedy answers."""
    prompts = ["The capital of France is", "Once upon a time there was a", "1, 2, 3, 4,",
               "The best way to learn to cook is"]
    answers: list = [None] * len(prompts)

    def one(i: int) -> None:
        answers[i] = generate(node, n, prompt=prompts[i])["response"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def ps(node) -> dict:
    status, body = node.call("GET", "/api/ps")
    assert status == 200, body
    return body


def split_of(node) -> list[dict] | None:
    models = ps(node)["models"]
    return models[0]["hippo"].get("split") if models else None


@pytest.mark.netns
@pytest.mark.slow
def test_forced_split_over_two_daemons_matches_one_daemon(tmp_path, monkeypatch):
    from hippoctl import main as ctl
    from hippoctl.client import HippoError
    from tests.netns import lan

    tc = _cluster_helpers()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `hippoctl run` reads a pipe first: an empty one
    budget = {"HIPPO_MEMORY_BUDGET": "2GB", "HIPPO_NUM_CTX": "1024"}
    with lan(2) as net:
        pair = Pair(net, tmp_path, budget, budget)
        try:
            pair.start()
            a, b = pair.a, pair.b
            run = dict(model="smol", temperature=0.0, seed=None, num_predict=8, keep_alive=None, verbose=False)
            one_cli = a.cli(ctl.run, prompt=["Say hello."], nodes=None, **run)
            one_gen, one_chat = generate(a), chat(a)
            one_together = together(a)
            assert split_of(a) is None and one_gen["eval_count"] == 10

            split_cli = a.cli(ctl.run, prompt=["Say hello."], nodes="alpha,beta", **run)
            assert split_cli == one_cli and one_cli.strip()
            split = split_of(a)
            assert [(s["node"], s["layers"]) for s in split] == [("alpha", [0, 15]), ("beta", [15, 30])]
            assert all(s["bytes"] > 150 * MB for s in split)
            gen = generate(a)
            assert gen["response"] == one_gen["response"] and gen["eval_count"] == one_gen["eval_count"]
            assert chat(a) == one_chat
            # Concurrent requests are batched through the ring, with one node's answers.
            assert together(a) == one_together and all(one_together)
            assert ps(a)["models"][0]["hippo"]["num_parallel"] == 4
            shown = a.cli(ctl.ps, json=False, history=False, limit=20)
            assert "smol:latest is split over 2 nodes: alpha layers 0-14" in shown and "beta layers 15-29" in shown
            hosted = ps(b)["hippo"]["hosted"]
            assert [(h["model"], h["layers"], h["rank"]) for h in hosted] == [("smol:latest", [15, 30], 1)]
            assert len(a.daemon.runner_pids()) == 1 and len(b.daemon.runner_pids()) == 1
            assert not (b.home / "models").exists() or not any((b.home / "models").iterdir())  # a shard copy only

            # Unloading the split stops the peer's runner too.
            status, _ = a.call("POST", "/api/generate", {"model": "smol", "keep_alive": 0})
            assert status == 200
            tc.wait_until(lambda: not a.daemon.runner_pids() and not b.daemon.runner_pids(), 10,
                          "both runners stopped")
            assert "hippo" not in ps(b)
            with pytest.raises(HippoError, match="gamma.*not a known peer"):
                a.cli(ctl.run, prompt=["Say hello."], nodes="alpha,gamma", **run)
            # Back to automatic: the model fits alpha alone again.
            a.cli(ctl.run, prompt=["Say hello."], nodes="auto", **run)
            assert split_of(a) is None
        finally:
            pair.stop()


def stream_lines(node, body: dict, lines: list, done: threading.Event) -> None:
    """POST body and append (time, parsed line) for each NDJSON line (run inside the namespace)."""
    req = urllib.request.Request(node.daemon.url + "/api/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            for raw in resp:
                if raw.strip():
                    lines.append((time.monotonic(), json.loads(raw)))
    except Exception as e:  # the stream broke off without an error line
        lines.append((time.monotonic(), {"exception": repr(e)}))
    finally:
        done.set()


def link(net_node, state: str) -> None:
    subprocess.run(["ip", "-n", net_node.ns, "link", "set", net_node.ifname, state], check=True)


@pytest.mark.netns
@pytest.mark.slow
def test_auto_split_follows_budgets_and_survives_a_dropped_link(tmp_path):
    from tests.netns import lan, start_in_netns

    tc = _cluster_helpers()
    budgets = {"alpha": 260 * MB, "beta": 300 * MB}
    with lan(2) as net:
        # One slot: the memory guard counts every slot's KV, and the budgets are tight.
        env = {"HIPPO_NUM_CTX": "2048", "HIPPO_NUM_PARALLEL": "1"}
        pair = Pair(net, tmp_path, {"HIPPO_MEMORY_BUDGET": str(budgets["alpha"]), **env},
                    {"HIPPO_MEMORY_BUDGET": str(budgets["beta"]), **env})
        try:
            pair.start()
            a, b = pair.a, pair.b
            d = smollm2_mlx_dir()
            p = model_parts(d, inspect_model_dir(d).as_details(), 2048)
            assert p.total > max(budgets.values()), "the model must fit neither node alone"
            want = planner.plan([planner.Node(n, f) for n, f in budgets.items()], p)

            first = generate(a, 6)  # a plain request: no placement, no manual step
            split = split_of(a)
            assert [(s["node"], s["layers"], s["bytes"]) for s in split] == [
                (s.node, [s.start, s.end], s.bytes) for s in want]
            assert split[0]["layers"][1] < 15, "the smaller budget holds fewer layers"
            assert first["eval_count"] == 6

            # The link drops mid-generation: the stream ends with an error within 5 s.
            lines: list = []
            done = threading.Event()
            body = {"model": "smol", "prompt": "Once upon a time", "raw": True,
                    "options": {"temperature": 0, "num_predict": 500}}
            start_in_netns(a.net.ns, stream_lines, a, body, lines, done)
            tc.wait_until(lambda: len(lines) >= 3, 60, "a few tokens streamed")
            dropped = time.monotonic()
            link(a.net, "down")
            assert done.wait(15), "the stream never ended"
            ended, last = lines[-1]
            took = ended - dropped
            print(f"\n[pipeline] stream ended {took:.2f}s after the link dropped: {last}")
            assert took < 5, took
            assert "error" in last and "beta" in last["error"], last
            assert not a.daemon.runner_pids(), "alpha's runner outlived the split"
            tc.wait_until(lambda: not b.daemon.runner_pids(), 6, "beta stopped its orphaned runner")

            # The next request plans again on what is left: alpha alone cannot hold it.
            status, body = a.call("POST", "/api/generate", {"model": "smol", "prompt": "hi", "stream": False,
                                                            "options": {"num_predict": 2}})
            assert status == 507, body
            assert "needs" in body["error"] and str(budgets["alpha"] // 1000 // 1000) in body["error"], body

            # With the link back, the split is planned and served again.
            link(a.net, "up")
            tc.wait_until(lambda: tc.trusted_and_fresh(a, b) and tc.trusted_and_fresh(b, a), 20, "peers again")
            again = generate(a, 6)
            assert again["response"] == first["response"]
            assert [s["layers"] for s in split_of(a)] == [s["layers"] for s in split]
        finally:
            pair.stop()


def stream_text(lines: list) -> tuple[str, dict]:
    parts = [body.get("response", "") for _, body in lines]
    return "".join(parts), lines[-1][1]


@pytest.mark.netns
@pytest.mark.slow
def test_a_node_lost_mid_stream_the_answer_goes_on(tmp_path):
    """A forced split over alpha and beta; beta's link drops mid-stream. alpha re-plans (the
    model fits alpha alone), replays the prompt and the tokens sent, and the same stream goes on
    with the tokens the uncut split gives (greedy). The split's load row is closed, beta kills
    its orphaned runner. Then beta's runner is killed mid-stream: the split is planned again
    over both nodes and the stream goes on too."""
    from tests.netns import in_netns, lan, start_in_netns

    tc = _cluster_helpers()
    env = {"HIPPO_MEMORY_BUDGET": "2GB", "HIPPO_NUM_CTX": "1024"}
    with lan(2) as net:
        pair = Pair(net, tmp_path, env, env)
        try:
            pair.start()
            a, b = pair.a, pair.b
            status, body = a.call("POST", "/api/hippo/placement", {"model": "smol", "nodes": ["alpha", "beta"]})
            assert status == 200, body
            request = {"model": "smol", "prompt": "Once upon a time", "raw": True,
                       "options": {"temperature": 0, "num_predict": 40}}

            def streamed() -> list:
                lines: list = []
                in_netns(a.net.ns, stream_lines, a, request, lines, threading.Event())
                return lines

            uncut, uncut_done = stream_text(streamed())
            assert uncut_done.get("done") and uncut_done["eval_count"] == 40, uncut_done
            assert [s["node"] for s in split_of(a)] == ["alpha", "beta"]
            first_load = max(r["id"] for r in a.call("GET", "/api/hippo/loads?limit=50")[1]["loads"])

            def cut_mid_stream(cut) -> tuple[list, float]:
                lines: list = []
                done = threading.Event()
                start_in_netns(a.net.ns, stream_lines, a, request, lines, done)
                tc.wait_until(lambda: len(lines) >= 8, 60, "a few tokens streamed")
                at = time.monotonic()
                cut()
                assert done.wait(60), "the stream never ended"
                return lines, at

            # 1. The link to beta drops: alpha continues alone.
            lines, cut_at = cut_mid_stream(lambda: link(b.net, "down"))
            text, last = stream_text(lines)
            after = [t for t, _ in lines if t > cut_at]
            gap = after[0] - cut_at
            assert "error" not in last and "exception" not in last, last
            assert last["done"] and last["eval_count"] == 40, last
            assert text == uncut
            assert split_of(a) is None, "the model now runs on alpha alone"
            rows = {r["id"]: r for r in a.call("GET", "/api/hippo/loads?limit=50")[1]["loads"]}
            successor_load = rows[max(rows)]["load_seconds"]
            prefill = uncut_done["prompt_eval_duration"] / 1e9
            print(f"\n[pipeline] link down: next token {gap:.2f}s later; the successor's load took "
                  f"{successor_load:.2f}s, a prefill of the prompt {prefill:.2f}s")
            # The pause is noticing the loss (at most LOST_AFTER + PING_TIMEOUT), the load here
            # and the replay of the prompt and 8+ tokens (about a second in all on a quiet
            # machine; a busy CI box is slower at each, so the bound follows what it measured).
            assert gap < LOST_AFTER + PING_TIMEOUT + successor_load + 3 * prefill + 1.0, (gap, successor_load)
            assert rows[first_load]["end_reason"] == "node lost" and rows[first_load]["reason"] == "split"
            assert [r["end_reason"] for i, r in rows.items() if i > first_load] == [None]
            assert len(a.daemon.runner_pids()) == 1
            tc.wait_until(lambda: not b.daemon.runner_pids(), 8, "beta stopped its orphaned runner")

            # 2. The link is back; the placement brings the split back on the next load.
            link(b.net, "up")
            tc.wait_until(lambda: tc.trusted_and_fresh(a, b) and tc.trusted_and_fresh(b, a), 20, "peers again")
            status, _ = a.call("POST", "/api/generate", {"model": "smol", "keep_alive": 0})
            tc.wait_until(lambda: not a.daemon.runner_pids(), 10, "alpha unloaded")
            assert stream_text(streamed())[0] == uncut and split_of(a) is not None

            # 3. beta's runner is killed mid-stream: beta still answers, so the split is planned again.
            victim = b.daemon.runner_pids()[0]
            lines, cut_at = cut_mid_stream(lambda: psutil.Process(victim).kill())
            text, last = stream_text(lines)
            assert "error" not in last and last["done"] and text == uncut, last
            assert [s["node"] for s in split_of(a)] == ["alpha", "beta"]
            assert len(a.daemon.runner_pids()) == 1 and len(b.daemon.runner_pids()) == 1
            assert victim not in b.daemon.runner_pids()
            assert not [r for r in a.call("GET", "/api/hippo/loads?limit=50")[1]["loads"]
                        if r["end_reason"] is None and r["id"] != max(rows)][1:]

            # 4. The link drops while the split is idle: it ends, recorded as the node's loss.
            idle_load = max(r["id"] for r in a.call("GET", "/api/hippo/loads?limit=50")[1]["loads"])
            link(b.net, "down")
            tc.wait_until(lambda: not a.daemon.runner_pids(), 30, "alpha ended the idle split")

            def idle_row() -> dict:  # the runner's exit is seen a moment before its row is closed
                return {r["id"]: r for r in a.call("GET", "/api/hippo/loads?limit=50")[1]["loads"]}[idle_load]

            tc.wait_until(lambda: idle_row()["end_reason"] is not None, 10, "the idle split's load closed")
            row = idle_row()
            assert row["reason"] == "split" and row["end_reason"] == "node lost", row
        finally:
            pair.stop()


def feature_requests() -> list[GenerateRequest]:
    ask = [{"role": "user", "content": "Name three colors."}]
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 12}},
              "required": ["color"], "additionalProperties": False}
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}
    return [GenerateRequest(messages=ask, grammar={"json_schema": schema}, options={"temperature": 0, "num_predict": 24}),
            GenerateRequest(messages=ask, options={"temperature": 0, "num_predict": 24, "stop": [","]}),
            GenerateRequest(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[weather],
                            tool_choice="required", options={"temperature": 0, "num_predict": 32})]


@SLOW
def test_split_chat_turn_two_prefills_only_its_new_tokens_on_every_rank(tmp_path):
    """Every rank keeps the last sequence's KV for its layers: turn 2 of a chat trims them to
    the shared prefix and prefills only the new tokens, with the tokens one runner gives; an
    unrelated request after it starts every rank afresh and is right too; structured output,
    stop strings and a required tool call come out as on one runner."""
    history = [{"role": "system", "content": "You are a terse assistant who answers in one line. " * 4},
               {"role": "user", "content": "Name three colors."}]

    def turn(messages, n=8):
        return GenerateRequest(messages=messages, options={"temperature": 0, "num_predict": n})

    async def main():
        model_dir = smollm2_mlx_dir()
        one = _runner(model_dir, tmp_path, num_parallel=1)
        ranks = _split(model_dir, tmp_path, [0, 15, 30])
        await asyncio.gather(one.start(120), *(r.start(120) for r in ranks))
        try:
            out = {}
            for name, runner in (("one", one), ("split", ranks[0])):
                tokens1, text1, done1 = await _generate(runner, turn(history))
                second = history + [{"role": "assistant", "content": text1},
                                    {"role": "user", "content": "And three fruits?"}]
                tokens2, _, done2 = await _generate(runner, turn(second))
                other = await _generate(runner, _requests(6)[0])
                features = [await _generate(runner, r) for r in feature_requests()]
                out[name] = (tokens1, done1, tokens2, done2, other[0], features)
            return out
        finally:
            for r in (one, *ranks):
                await r.kill()

    out = asyncio.run(main())
    tokens1, done1, tokens2, done2, other, features = out["split"]
    assert (tokens1, tokens2, other) == (out["one"][0], out["one"][2], out["one"][4])
    # Structured output, a stop string and tools behave on the split as on one runner.
    for (tokens, text, done), (want_tokens, want_text, want_done) in zip(features, out["one"][5]):
        assert (tokens, text, done.done_reason, done.tool_calls) == (
            want_tokens, want_text, want_done.done_reason, want_done.tool_calls)
    schema_text, stop_done = features[0][1], features[1][2]
    assert isinstance(json.loads(schema_text)["color"], str), schema_text
    assert stop_done.done_reason == "stop" and "," not in features[1][1], features[1]
    assert done1.cached_tokens == 0 and done2.cached_tokens >= done1.prompt_tokens, (done1, done2)
    assert done2.prompt_tokens - done2.cached_tokens < done2.prompt_tokens / 3


@pytest.mark.netns
@pytest.mark.slow
def test_any_node_answers_a_model_only_a_peer_holds(tmp_path):
    """alpha has never seen the model; beta has it. A request to alpha is served: alpha copies
    the model from beta (a trusted peer) and loads it; a model nobody has is still a 404."""
    tc = _cluster_helpers()
    from tests.netns import lan

    env = {"HIPPO_MEMORY_BUDGET": "2GB", "HIPPO_NUM_CTX": "1024"}
    with lan(2) as net:
        pair = Pair(net, tmp_path, env, env)
        try:
            pair.start(create_on="b")
            a, b = pair.a, pair.b
            tc.wait_until(lambda: "smol:latest" in (a.row(b) or {}).get("models", []), 20, "alpha sees beta's model")
            assert a.call("GET", "/api/tags")[1]["models"] == []
            answer = generate(a, 6)
            assert answer["response"] == generate(b, 6)["response"] and answer["eval_count"] == 6
            tags = a.call("GET", "/api/tags")[1]["models"]
            assert [m["name"] for m in tags] == ["smol:latest"]
            status, body = a.call("POST", "/api/show", {"model": "smol"})
            assert status == 200 and body["hippo"]["source"] == "peer:beta", body
            status, body = a.call("POST", "/api/generate", {"model": "nobody-has-it", "prompt": "hi", "stream": False})
            assert status == 404 and "nobody-has-it" in body["error"], body
            # The audit log says how alpha got the model: copied the first time, here after.
            generate(a, 2)
            rows = a.call("GET", "/api/hippo/audit")[1]["requests"]
            assert [(r["model"], r["model_source"]) for r in reversed(rows)] == [
                ("smol:latest", "copied from peer beta"), ("nobody-has-it", None), ("smol:latest", "local")], rows
        finally:
            pair.stop()
