"""Forwarding: a request for a model this node cannot run goes to a trusted peer that holds it.

The two-daemon test runs alpha (a memory budget too small for the model) and beta (which holds
it) on a private LAN: requests to alpha in both APIs and both delivery modes stream beta's
answer, embeddings too, alpha's audit log says so, a client that leaves cancels beta's job, a
load on beta frozen past the silence is carried by heartbeats that never reach the client, and
beta frozen or vanishing ends the stream with an error within seconds; forged forward requests
to beta are refused before anything runs. The three-daemon test cuts the link to the peer that
answers and another holder continues the same greedy answer. The loopback tests put a
tampering (or stalling) proxy between a forwarding node and a real daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import ollama
import openai
import pytest
from aiohttp import ClientSession, web

from hippod.cluster import forward, frames, planner, trust
from hippod.config import ConfigError, load_settings
from hippod.protocol import (FORWARD_EMBED_PATH, FORWARD_PATH, MAX_RESUME, DoneEvent, ForwardEmbed,
                             ForwardRequest, ForwardStart, GenerateRequest, Heartbeat, SplitRecordError,
                             TokenEvent, decode_forward, decode_forward_embed, decode_frame, forward_body)
from hippod.store.records import ModelRecord, PeerRecord
from tests.daemon import Daemon
from tests.modelfiles import smollm2_mlx_dir

MB = 10**6


# -- the records and their MACs -------------------------------------------------------------------


def test_forward_records_are_checked_and_frames_bound_to_request_and_place():
    req = GenerateRequest(prompt="hi", raw=True, options={"num_predict": 3})
    body = json.loads(json.dumps(forward_body(ForwardRequest("smol", req, "5m"))))
    back = decode_forward(body)
    assert (back.model, back.keep_alive, back.request.prompt, back.request.options) == ("smol", "5m", "hi", req.options)
    resumed = decode_forward({**body, "request": {"prompt": "hi", "resume": [1, 2**31 - 1]}})
    assert resumed.request.resume == [1, 2**31 - 1]
    for bad, param in (({**body, "model": ""}, "model"), ({**body, "keep_alive": True}, "keep_alive"),
                       ({**body, "request": {"arrival": 2}}, "request"),
                       ({**body, "request": {"resume": [1, "2"]}}, "request.resume"),
                       ({**body, "request": {"resume": [True]}}, "request.resume"),
                       ({**body, "request": {"resume": [2**31]}}, "request.resume"),
                       ({**body, "request": {"resume": [-1]}}, "request.resume"),
                       ({**body, "request": {"resume": [0] * (MAX_RESUME + 1)}}, "request.resume"),
                       ({**body, "request": {"resume": 5}}, "request.resume"),
                       ({**body, "request": {"prompt": 5}}, "request.prompt"),
                       ({**body, "request": {"logprobs": True}}, "request.logprobs"),
                       ({**body, "request": {"messages": [{"role": "user", "content": 3}]}}, "request.messages"),
                       ({**body, "request": {"grammar": {"regex": "x"}}}, "request.grammar"),
                       ({**body, "request": {"tool_choice": "sometimes"}}, "request.tool_choice")):
        with pytest.raises(SplitRecordError) as e:
            decode_forward(bad)
        assert e.value.param == param, (bad, e.value)
    embed = {"model": "smol", "inputs": ["a", "b"], "truncate": False, "num_ctx": 512, "keep_alive": "1m"}
    assert decode_forward_embed(embed) == ForwardEmbed("smol", ["a", "b"], False, 512, "1m")
    for bad, param in (({**embed, "inputs": None}, "inputs"), ({**embed, "inputs": ["a", 3]}, "inputs"),
                       ({**embed, "inputs": "a"}, "inputs"), ({**embed, "truncate": "yes"}, "truncate"),
                       ({**embed, "num_ctx": 0}, "num_ctx"), ({**embed, "num_ctx": True}, "num_ctx"),
                       ({**embed, "model": None}, "model"), ({**embed, "keep_alive": [1]}, "keep_alive")):
        with pytest.raises(SplitRecordError) as e:
            decode_forward_embed(bad)
        assert e.value.param == param, (bad, e.value)

    secret = trust.new_secret()
    beta, alpha = trust.Keyring("beta-id", secret), trust.Keyring("alpha-id", secret)
    signer = frames.FrameSigner(beta, "nonce-1")
    lines = [signer.line(ForwardStart("smol:latest", "d" * 64)), signer.line(TokenEvent("Paris", 7)),
             signer.line(Heartbeat())]
    frames_ = [decode_frame(line) for line in lines]
    assert [f.seq for f in frames_] == [0, 1, 2]
    assert all(alpha.verify_frame("nonce-1", f.seq, f.data, f.mac, "beta-id") for f in frames_)
    f = frames_[1]
    assert not alpha.verify_frame("nonce-2", f.seq, f.data, f.mac, "beta-id")  # another request's frame
    assert not alpha.verify_frame("nonce-1", 0, f.data, f.mac, "beta-id")  # moved to another place
    assert not alpha.verify_frame("nonce-1", f.seq, f.data.replace("Paris", "Pwned"), f.mac, "beta-id")
    assert not alpha.verify_frame("nonce-1", f.seq, f.data, f.mac, "alpha-id")  # not beta's
    stranger = trust.Keyring("beta-id", trust.new_secret())
    forged = frames.FrameSigner(stranger, "nonce-1")
    forged.seq = 1
    g = decode_frame(forged.line(TokenEvent("Pwned", 7)))
    assert not alpha.verify_frame("nonce-1", g.seq, g.data, g.mac, "beta-id")
    h = decode_frame(forged.line(Heartbeat()))  # a forged keep-alive cannot stretch a dead peer's life
    assert not alpha.verify_frame("nonce-1", h.seq, h.data, h.mac, "beta-id")


def test_heartbeats_fill_the_silences_and_closing_cancels_the_pending_step():
    async def slow():
        yield "a"
        await asyncio.sleep(0.35)
        yield "b"
        await asyncio.sleep(10)
        yield "never"

    async def main():
        got, t0 = [], time.monotonic()
        beats = frames.with_heartbeats(slow(), every=0.1)
        async for event in beats:
            got.append(event)
            if event == "b":
                break
        await beats.aclose()
        return got, time.monotonic() - t0

    got, took = asyncio.run(main())
    assert got[0] == "a" and got[-1] == "b" and took < 2, (got, took)
    assert 2 <= sum(isinstance(e, Heartbeat) for e in got) <= 4, got


def test_peer_silence_is_a_setting_longer_than_the_heartbeats(tmp_path):
    assert load_settings(environ={"HIPPO_HOME": str(tmp_path)}).peer_silence == 5.0
    assert load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_PEER_SILENCE": "8"}).peer_silence == 8.0
    for bad in ("1", "nan", "soon"):
        with pytest.raises(ConfigError, match="peer_silence"):
            load_settings(environ={"HIPPO_HOME": str(tmp_path), "HIPPO_PEER_SILENCE": bad})


def test_a_split_is_judged_from_the_manifest_before_anything_is_copied():
    """Copy (to split) only when some split over this node and the peers fits; else forward."""
    details = {"num_layers": 30, "weights_bytes": 300 * MB, "kv_heads": 3, "head_dim": 64, "kv_dtype_bytes": 2}
    rec = ModelRecord(name="m:latest", source="peer:beta", digest="0" * 64, files=[], format="mlx",
                      size=300 * MB, details=details)
    fits = forward.split_fits
    assert fits(rec, 1024, 1, planner.Node("alpha", 400 * MB), [planner.Node("beta", 400 * MB)])
    # alpha cannot hold even a runner's overhead: no split, however big beta is
    assert not fits(rec, 1024, 1, planner.Node("alpha", 100 * MB), [planner.Node("beta", 10**12)])
    assert not fits(rec, 1024, 1, planner.Node("alpha", 400 * MB), [])


def test_a_forwarding_decision_is_reused_until_it_expires_or_its_peer_fails(tmp_path):
    """The next request for a model forwarded lately goes to the same peer without asking the
    peers again, for ROUTE_FOR seconds, while that peer is trusted, fresh and lists the model."""
    from types import SimpleNamespace

    from hippod.cluster.peers import PeerTable
    from hippod.runners import Forward
    from hippod.store.database import Store

    store = Store(tmp_path / "hippo.db")
    table = PeerTable(store)

    def get(num_ctx=None):
        return routes.get("m:latest", num_ctx, forward._holders(SimpleNamespace(peers=table), "m:latest"))

    def peer(name: str, models: list[str], trusted: bool = True) -> None:
        store.put_peer(PeerRecord(node_id=name * 4, name=name, addresses=["10.0.0.2"], port=11434,
                                  memory_total=1, memory_free=1, version="x", trusted=trusted, models=models))

    now = [0.0]
    routes = forward.RecentRoutes(clock=lambda: now[0])
    peer("beta", ["m:latest"])
    routes.put("m:latest", None, Forward("beta", 5))
    assert get() == Forward("beta", 5)
    assert get(4096) is None  # another context is another estimate
    now[0] += forward.ROUTE_FOR
    assert get() is None  # expired
    routes.put("m:latest", None, Forward("beta", 5))
    routes.forget("m:latest", "gamma")
    assert get() == Forward("beta", 5)
    routes.forget("m:latest", "beta")  # lost or refused
    assert get() is None
    routes.put("m:latest", None, Forward("beta", 5))
    peer("beta", ["other:latest"])  # no longer lists it
    assert get() is None
    routes.put("m:latest", None, Forward("beta", 5))
    peer("beta", ["m:latest"], trusted=False)
    assert get() is None
    routes.put("m:latest", None, Forward("beta", 5))
    peer("beta", ["m:latest"])
    table.gone["beta" * 4] = time.monotonic()  # said goodbye
    assert get() is None
    # A reused decision stands only while the model still does not fit here.
    import asyncio

    budget = [4]

    async def fetch(name):
        return "copied"

    splits = SimpleNamespace(cluster=SimpleNamespace(peers=table), routes=routes, fetch=fetch,
                             scheduler=SimpleNamespace(budget=lambda: budget[0]))
    table.gone.clear()
    routes.put("m:latest", None, Forward("beta", 5))
    assert asyncio.run(forward.locate(splits, "m:latest", None)) == Forward("beta", 5)
    budget[0] = 5  # memory freed here: it fits now
    assert asyncio.run(forward.locate(splits, "m:latest", None)) == "copied"
    # One decision per (model, num_ctx) asked for: a client asking every num_ctx cannot grow it.
    for n in range(3 * forward.MAX_ROUTES):
        routes.put("m:latest", n, Forward("beta", 5))
    assert len(routes._routes) <= forward.MAX_ROUTES
    assert routes._routes[("m:latest", 3 * forward.MAX_ROUTES - 1)][0] == Forward("beta", 5)


# -- a tampering proxy between a forwarding node and a real daemon ------------------------------


class _Peers:
    def __init__(self, peer: PeerRecord):
        self.peer = peer

    def find(self, ref: str) -> PeerRecord | None:
        return self.peer if ref == self.peer.name else None


class _Forwarder:
    """What frames.request needs of a cluster: a keyring holding the secret and a peer table."""

    def __init__(self, keyring: trust.Keyring, peer: PeerRecord):
        self.keyring = keyring
        self.peers = _Peers(peer)


async def _proxy(upstream: str, mangle) -> tuple[web.AppRunner, int]:
    """Passes a forward request on unchanged; `mangle(index, line)` rewrites each answer line
    (None drops it, "CUT" ends the answer there, "STALL" sends nothing more but keeps the
    connection open, as a frozen host or a dead link would)."""
    session = ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-hippo")}
        headers["Content-Type"] = "application/json"
        async with session.post(upstream + request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower().startswith("x-hippo") or k == "Content-Type"})
            await resp.prepare(request)
            i = 0
            while line := await up.content.readline():
                out = mangle(i, line)
                i += 1
                if out == "CUT":
                    break
                while out == "STALL" and request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.05)
                if isinstance(out, bytes):
                    with contextlib.suppress(ConnectionError):  # the forwarding side gave up
                        await resp.write(out)
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post(FORWARD_PATH, handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def _swap_text(i: int, line: bytes) -> bytes:
    if i != 2:
        return line
    frame = json.loads(line)
    event = json.loads(frame["data"])
    event["text"] = " HACKED"
    frame["data"] = json.dumps(event, separators=(",", ":"))
    return (json.dumps(frame) + "\n").encode()


def _forged_heartbeat(i: int, line: bytes) -> bytes:
    """A keep-alive signed without the secret, slipped in at frame 2."""
    if i != 2:
        return line
    signer = frames.FrameSigner(trust.Keyring("x", trust.new_secret()), "any")
    signer.seq = 2
    return signer.line(Heartbeat()) + line


class _Beta:
    """A real daemon holding smol, and a forwarding node's view of it through a proxy."""

    def __init__(self, daemon: Daemon, secret: str):
        self.daemon = daemon
        self.node_id = (daemon.home / "node-id").read_text().strip()
        self.keyring = trust.Keyring("alpha-" + "0" * 8, secret)
        self.stranger = trust.Keyring("alpha-" + "0" * 8, trust.new_secret())

    def run(self, request: GenerateRequest, mangle=lambda i, line: line, silence: float = 30.0,
            on_event=lambda event: None) -> tuple[list, str | None, float]:
        """(events, error, seconds) of one forwarded generation through a proxy."""
        async def main():
            runner, port = await _proxy(self.daemon.url, mangle)
            peer = PeerRecord(node_id=self.node_id, name="beta", addresses=["127.0.0.1"], port=port,
                              memory_total=0, memory_free=0, version="test", trusted=True)
            body = forward_body(ForwardRequest("smol", request))
            events, error, t0 = [], None, time.monotonic()
            try:
                async with ClientSession() as session:
                    try:
                        async for ev in frames.request(_Forwarder(self.keyring, peer), session, "beta",
                                                       FORWARD_PATH, body, silence):
                            events.append(ev)
                            on_event(ev)
                    except frames.ForwardError as e:
                        error = f"{type(e).__name__} {e.status}: {e}"
            finally:
                await runner.cleanup()
            return events, error, time.monotonic() - t0

        return asyncio.run(main())

    def post(self, keyring: trust.Keyring, body: dict, tamper: bool = False) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        headers = keyring.sign("POST", FORWARD_PATH, data, self.node_id)
        if tamper:
            data = data.replace(b"[1,", b"[2,").replace(b"[1, ", b"[2, ")
        return _post_raw(self.daemon.url + FORWARD_PATH, data, headers)


@pytest.fixture(scope="module")
def beta_alone(tmp_path_factory):
    secret = trust.new_secret()
    home = tmp_path_factory.mktemp("forward") / "beta"
    with Daemon(home, env={"HIPPO_CLUSTER_SECRET": secret, "HIPPO_NUM_CTX": "512",
                           "HIPPO_NODE_NAME": "beta"}) as beta:
        status, body = beta.request("POST", "/api/create", {"model": "smol", "from": str(smollm2_mlx_dir()),
                                                            "stream": False})
        assert status == 200, body
        yield _Beta(beta, secret)


def _greedy(n: int, **extra) -> GenerateRequest:
    return GenerateRequest(prompt="The capital of France is", raw=True,
                           options={"temperature": 0, "num_predict": n}, **extra)


def _tokens(events: list) -> list[TokenEvent]:
    return [e for e in events if isinstance(e, TokenEvent)]


@pytest.mark.slow
def test_a_tampered_dropped_cut_or_stalled_answer_frame_is_detected(beta_alone):
    events, error, _ = beta_alone.run(_greedy(6))
    assert error is None, error
    assert isinstance(events[0], ForwardStart) and events[0].model == "smol:latest"
    assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 6
    text = "".join(e.text for e in _tokens(events))
    assert text and "HACKED" not in text

    for mangle, says in ((_swap_text, "ForwardError 502: the answer from peer beta failed authentication at frame 2"),
                         (lambda i, line: None if i == 2 else line, "failed authentication at frame 2"),
                         (_forged_heartbeat, "failed authentication at frame 2"),
                         (lambda i, line: "CUT" if i == 3 else line, "PeerLost 502: peer beta went away mid-answer"),
                         (lambda i, line: "STALL" if i == 3 else line, "went away mid-answer (silent for 2 s)")):
        events, error, took = beta_alone.run(_greedy(6), mangle, silence=2.0)
        assert error is not None and says in error, error
        assert not any("HACKED" in e.text for e in _tokens(events))
        assert not any(isinstance(e, DoneEvent) for e in events)
        assert took < 6, (error, took)  # a stall is noticed after the silence, not a long read timeout
    print(f"\n[forward] a stalled peer was counted lost {took:.2f}s after the request (silence 2 s)")


@pytest.mark.slow
def test_heartbeats_carry_a_frozen_runner_and_never_reach_the_events(beta_alone):
    """beta's runner is stopped mid-answer for twice the silence: beta's daemon sends heartbeats,
    the forwarding side waits, and the answer ends as the uncut one; no heartbeat is an event."""
    uncut, error, _ = beta_alone.run(_greedy(12))
    assert error is None, error
    seen: list[bytes] = []
    stopped: list[int] = []

    def freeze(event) -> None:
        if isinstance(event, TokenEvent) and not stopped:
            stopped.extend(beta_alone.daemon.runner_pids())
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(5.0, lambda: [os.kill(p, signal.SIGCONT) for p in stopped])

    try:
        events, error, took = beta_alone.run(_greedy(12), lambda i, line: seen.append(line) or line,
                                             silence=2.5, on_event=freeze)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert error is None and stopped, error
    assert took > 5, took
    beats = [line for line in seen if json.loads(json.loads(line)["data"])["type"] == "heartbeat"]
    assert len(beats) >= 3, seen
    assert not any(isinstance(e, Heartbeat) for e in events)
    assert [e.text for e in _tokens(events)] == [e.text for e in _tokens(uncut)]
    assert events[-1].completion_tokens == 12


@pytest.mark.slow
def test_a_resumed_forward_continues_and_bad_or_forged_resumes_are_refused(beta_alone):
    whole, error, _ = beta_alone.run(_greedy(8))
    assert error is None, error
    ids = [i for e in _tokens(whole) for i in (e.ids or [e.token])]
    assert len(ids) == 8, ids
    rest, error, _ = beta_alone.run(_greedy(8, resume=ids[:3]))
    assert error is None, error
    assert [i for e in _tokens(rest) for i in (e.ids or [e.token])] == ids[3:]
    assert rest[-1].completion_tokens == 8
    # The text of the replayed tokens is not sent again: the client already has it.
    sent = "".join(e.text for e in _tokens(whole))
    assert sent.endswith("".join(e.text for e in _tokens(rest)))

    # An id outside the vocabulary: a clear 400 from the runner, which keeps running.
    _, error, _ = beta_alone.run(_greedy(8, resume=[1, 49152 + 7]))
    assert error is not None and "400" in error and "vocabulary" in error, error
    body = forward_body(ForwardRequest("smol", _greedy(4, resume=[1, 2])))
    for bad in ([1, 2**31], [1, "2"], [1, None]):
        status, answer = beta_alone.post(beta_alone.keyring, {**body, "request": {**body["request"], "resume": bad}})
        assert status == 400 and "resume" in answer["error"], (bad, status, answer)
    for keyring, tamper in ((beta_alone.stranger, False), (beta_alone.keyring, True)):
        status, answer = beta_alone.post(keyring, body, tamper)
        assert status == 403 and "forbidden" in answer["error"], (status, answer)
    # The embedding route is guarded the same way: unsigned or forged, refused unread.
    data = json.dumps({"model": "smol", "inputs": ["hi"]}).encode()
    for headers in ({}, beta_alone.stranger.sign("POST", FORWARD_EMBED_PATH, data, beta_alone.node_id)):
        status, answer = _post_raw(beta_alone.daemon.url + FORWARD_EMBED_PATH, data, headers)
        assert status == 403 and "forbidden" in answer["error"], (status, answer)
    empty = json.dumps({"model": "smol", "inputs": ["hi", ""]}).encode()
    status, answer = _post_raw(beta_alone.daemon.url + FORWARD_EMBED_PATH, empty,
                               beta_alone.keyring.sign("POST", FORWARD_EMBED_PATH, empty, beta_alone.node_id))
    assert status == 400 and "inputs[1] must not be empty" in answer["error"], (status, answer)
    again, error, _ = beta_alone.run(_greedy(8))
    assert error is None and [e.text for e in _tokens(again)] == [e.text for e in _tokens(whole)]


# -- two daemons on a private LAN ---------------------------------------------------------------


def _in(node, fn, *args):
    from tests.netns import in_netns

    return in_netns(node.net.ns, fn, *args)


def _post_raw(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read().splitlines()[0])
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(url: str, body: dict, keep: int | None, lines: list) -> None:
    """POST and collect NDJSON lines; after `keep` lines, hang up (a client that goes away)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            for raw in resp:
                if raw.strip():
                    lines.append(json.loads(raw))
                if keep is not None and len(lines) >= keep:
                    return
    except Exception as e:
        lines.append({"exception": repr(e)})


def _forward_rows(node) -> list[dict]:
    rows = node.call("GET", "/api/hippo/audit?limit=100")[1]["requests"]
    return [r for r in reversed(rows) if r["route"] == FORWARD_PATH]


@pytest.mark.netns
@pytest.mark.slow
def test_a_model_too_big_here_is_forwarded_to_the_peer_that_holds_it(tmp_path):
    from tests.test_cluster import wait_until
    from tests.test_pipeline import Pair, generate

    from tests.netns import lan

    with lan(2) as net:
        pair = Pair(net, tmp_path, {"HIPPO_MEMORY_BUDGET": "100MB", "HIPPO_NUM_CTX": "1024"},
                    {"HIPPO_MEMORY_BUDGET": "2GB", "HIPPO_NUM_CTX": "1024"})
        try:
            pair.start(create_on="b")
            a, b = pair.a, pair.b
            wait_until(lambda: "smol:latest" in (a.row(b) or {}).get("models", []), 20, "alpha sees beta's model")
            b_url = b.daemon.url + FORWARD_PATH

            # Forged forward requests reach beta's route and are refused before any work.
            data = json.dumps(forward_body(ForwardRequest("smol", GenerateRequest(prompt="hi", raw=True)))).encode()
            good = trust.Keyring(a.node_id, _secret(a))
            stranger = trust.Keyring(a.node_id, trust.new_secret())
            tampered = good.sign("POST", FORWARD_PATH, data, b.node_id)
            for headers, body in (({}, data), (stranger.sign("POST", FORWARD_PATH, data, b.node_id), data),
                                  (tampered, data.replace(b"hi", b"ho"))):
                status, answer = _in(a, _post_raw, b_url, body, headers)
                assert status == 403 and "forbidden" in answer["error"], (status, answer)
            assert b.call("GET", "/api/ps")[1]["models"] == []  # nothing ran, nothing loaded

            # Ollama, not streaming: beta's answer, alpha never copies the model.
            via_a = generate(a, 6)
            direct = generate(b, 6)
            assert via_a["response"] == direct["response"] and via_a["eval_count"] == 6
            assert set(via_a) == set(direct) and via_a["model"] == "smol:latest"
            assert a.call("GET", "/api/tags")[1]["models"] == []
            assert a.call("GET", "/api/ps")[1]["models"] == []

            # Ollama streaming chat and OpenAI both ways, through the official clients.
            def clients(url: str) -> dict:
                oc = ollama.Client(host=url)
                chat = list(oc.chat(model="smol", messages=[{"role": "user", "content": "Name three colors."}],
                                    stream=True, options={"temperature": 0, "num_predict": 8}))
                ai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                msgs = [{"role": "user", "content": "Name three colors."}]
                whole = ai.chat.completions.create(model="smol", messages=msgs, max_tokens=8, temperature=0)
                parts = list(ai.chat.completions.create(model="smol", messages=msgs, max_tokens=8, temperature=0,
                                                        stream=True))
                comp = list(ai.completions.create(model="smol", prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                                  stream=True))
                return {"chat": "".join(c.message.content for c in chat), "chat_done": chat[-1].done_reason,
                        "chat_count": chat[-1].eval_count,
                        "whole": whole.choices[0].message.content, "fp": whole.system_fingerprint,
                        "usage": whole.usage.completion_tokens, "finish": whole.choices[0].finish_reason,
                        "parts": "".join(p.choices[0].delta.content or "" for p in parts if p.choices),
                        "comp": "".join(c.choices[0].text for c in comp if c.choices)}

            got, want = _in(a, clients, a.daemon.url), _in(b, clients, b.daemon.url)
            assert got == want and got["chat"] and got["whole"] == got["parts"], (got, want)

            # The audit log on alpha says where each answer came from; beta logged them too.
            rows = a.call("GET", "/api/hippo/audit?limit=100")[1]["requests"]
            served = [r for r in rows if r["route"] != FORWARD_PATH]
            assert len(served) == 5 and {r["model_source"] for r in served} == {"forwarded to beta"}, rows
            assert all(r["status"] == 200 and r["completion_tokens"] > 0 for r in served), rows
            # beta logs each forward when its handler ends, which may be just after alpha answered.
            wait_until(lambda: len(_forward_rows(b)) >= 8, 15, "beta logged every forwarded request")
            forwarded = _forward_rows(b)
            assert [r["status"] for r in forwarded] == [403, 403, 403, 200, 200, 200, 200, 200], forwarded

            # A client that goes away cancels the job on beta.
            body = {"model": "smol", "prompt": "Count: 1, 2, 3,", "raw": True,
                    "options": {"num_predict": 5000, "temperature": 0}}
            lines: list = []
            _in(a, _stream, a.daemon.url + "/api/generate", body, 3, lines)
            assert len(lines) == 3 and all(not line.get("done") for line in lines), lines
            wait_until(lambda: len(_forward_rows(b)) == 9, 60, "beta ends the forwarded job")
            last = _forward_rows(b)[-1]
            assert last["status"] == 499 and last["completion_tokens"] < 5000, last

            # Embeddings of a model only beta can run are beta's, in all three routes.
            got, want = _in(a, _embeddings, a.daemon.url), _in(b, _embeddings, b.daemon.url)
            assert got == want and len(got["embed"]) == 2 and got["legacy"], (got.keys(), want.keys())
            rows = [r for r in a.call("GET", "/api/hippo/audit?limit=3")[1]["requests"]]
            assert [r["model_source"] for r in rows] == ["forwarded to beta"] * 3, rows

            # beta's load is slow: its runner processes are frozen for longer than the silence a
            # lost peer gets. beta's heartbeats keep the stream; none shows in the ollama chunks.
            def ollama_stream(url: str) -> list:
                oc = ollama.Client(host=url)
                return [dict(c) for c in oc.generate(model="smol", prompt="Once upon a time", raw=True,
                                                     stream=True, options={"temperature": 0, "num_predict": 12})]

            uncut = _in(b, ollama_stream, b.daemon.url)
            b.call("POST", "/api/generate", {"model": "smol", "keep_alive": 0})
            wait_until(lambda: b.call("GET", "/api/ps")[1]["models"] == [], 20, "beta unloaded smol")
            frozen: set[int] = set()
            freezer = threading.Thread(target=_freeze_runners, args=(b, 7.0, frozen))
            freezer.start()
            t0 = time.monotonic()
            try:
                got = _in(a, ollama_stream, a.daemon.url)
            finally:
                freezer.join()
            took = time.monotonic() - t0
            print(f"\n[forward] a load frozen for 7 s: alpha's ollama stream ended after {took:.1f}s")
            assert frozen and took > 7 and got[-1]["done"] and got[-1]["eval_count"] == 12, (frozen, took, got[-1])
            assert "".join(c["response"] for c in got) == "".join(c["response"] for c in uncut)
            assert {k for c in got for k in c} == {k for c in uncut for k in c}, got
            assert all(c["response"] or c["done"] for c in got), got  # no empty keep-alive chunk

            # beta's daemon freezes mid-answer (no other peer holds smol): an error within ~5 s.
            lines = []
            t = threading.Thread(target=_in, args=(a, _stream, a.daemon.url + "/api/generate", body, None, lines))
            t.start()
            wait_until(lambda: len(lines) >= 3, 60, "tokens arrive from beta")
            os.kill(b.daemon.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                t.join(15)
                took = time.monotonic() - t0
            finally:
                os.kill(b.daemon.proc.pid, signal.SIGCONT)
            assert not t.is_alive()
            print(f"\n[forward] a frozen peer's loss reached the client {took:.2f}s after it froze")
            assert took < 7, took
            error = lines[-1].get("error", "")
            assert "beta went away" in error and "silent for 5 s" in error and "smol" in error, lines[-3:]

            # A peer frozen past STALE_AFTER is not used until it answers a probe again.
            wait_until(lambda: any(n["name"] == "beta" and not n["stale"]
                                   for n in a.call("GET", "/api/hippo/nodes")[1]["nodes"]), 30, "alpha sees beta again")

            # Beta vanishing mid-stream ends alpha's stream with an error that says so.
            lines = []
            t = threading.Thread(target=_in, args=(a, _stream, a.daemon.url + "/api/generate", body, None, lines))
            t.start()
            wait_until(lambda: len(lines) >= 3 or not t.is_alive(), 60, "tokens arrive from beta")
            assert len(lines) >= 3, lines
            b.daemon.kill()
            t.join(60)
            assert not t.is_alive()
            assert "error" in lines[-1] and "beta went away" in lines[-1]["error"], lines[-3:]
            assert not any(line.get("done") for line in lines)
            row = a.call("GET", "/api/hippo/audit?limit=1")[1]["requests"][0]
            assert row["model_source"] == "forwarded to beta" and "went away" in (row["error"] or ""), row
        finally:
            pair.stop()


def _embeddings(url: str) -> dict:
    oc = ollama.Client(host=url)
    ai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return {"embed": oc.embed(model="smol", input=["Paris is a city.", "Cats purr."]).embeddings,
            "legacy": oc.embeddings(model="smol", prompt="Paris is a city.").embedding,
            "openai": [d.embedding for d in ai.embeddings.create(model="smol", input=["Cats purr."]).data]}


def _freeze_runners(node, seconds: float, frozen: set) -> None:
    """SIGSTOP every runner process of node (the spare a load goes into, or one it starts) for
    `seconds`, then SIGCONT them all."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for pid in set(node.daemon.runner_pids()) - frozen:
                os.kill(pid, signal.SIGSTOP)
                frozen.add(pid)
            time.sleep(0.02)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _active(node) -> int:
    """Requests node's runners are generating now, as they say over their sockets."""
    n = 0
    for path in node.home.rglob("runner-*.sock"):
        try:
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(5)
                c.connect(str(path))
                c.sendall(b'{"kind":"info"}\n')
                n += json.loads(c.makefile().readline()).get("active_requests", 0)
        except (OSError, ValueError):
            continue
    return n


def _secret(node) -> str:
    return trust.load_secret(node.daemon.env["HIPPO_CLUSTER_SECRET"], node.home)


@pytest.mark.netns
@pytest.mark.slow
def test_a_peer_lost_mid_answer_hands_the_stream_to_another_holder(tmp_path):
    """alpha forwards to one of beta and gamma (both hold smol); that one's link drops
    mid-stream. alpha notices within the silence, gamma (or beta) continues after the tokens
    sent, and the answer is the uncut greedy one; alpha's audit row names both peers."""
    from tests import test_cluster as tc
    from tests.netns import lan, start_in_netns
    from tests.test_pipeline import link, stream_lines, stream_text

    secret = trust.new_secret()
    common = {"HIPPO_CLUSTER_SECRET": secret, "HIPPO_KEEP_ALIVE": "10m", "HIPPO_NUM_CTX": "1024"}
    with lan(3) as net:
        nodes = [tc.Node(net[i], tmp_path / name, name, {**common, "HIPPO_MEMORY_BUDGET": budget})
                 for i, (name, budget) in enumerate((("alpha", "100MB"), ("beta", "2GB"), ("gamma", "2GB")))]
        a, b, g = nodes
        try:
            for n in nodes:
                n.start()
            for n in (b, g):
                tc.wait_until(lambda: tc.trusted_and_fresh(a, n) and tc.trusted_and_fresh(n, a), 30, "peers trust")
                status, body = n.call("POST", "/api/create", {"model": "smol", "from": str(smollm2_mlx_dir()),
                                                              "stream": False})
                assert status == 200, body
            tc.wait_until(lambda: all("smol:latest" in (a.row(n) or {}).get("models", []) for n in (b, g)), 30,
                          "alpha sees both holders")
            request = {"model": "smol", "prompt": "Once upon a time", "raw": True,
                       "options": {"temperature": 0, "num_predict": 16}}

            def streamed(node) -> list:
                lines: list = []
                in_netns_of(node, stream_lines, node, request, lines, threading.Event())
                return lines

            uncut, uncut_done = stream_text(streamed(a))  # forwarded, uncut
            assert uncut_done.get("done") and uncut_done["eval_count"] == 16, uncut_done
            for n in (b, g):  # both warm, both give the same greedy answer
                assert stream_text(streamed(n))[0] == uncut

            # beta refuses (its memory or its max_loaded_models is taken by pinned models): gamma takes the request
            # before anything was streamed. alpha asks beta first (peers are listed by name).
            assert b.call("POST", "/api/generate", {"model": "smol", "keep_alive": 0})[0] == 200
            pins, refusal = _fill_with_pinned(b, "smol")
            assert refusal["status"] in (503, 507) and "pinned" in refusal["error"], refusal
            text, last = stream_text(streamed(a))
            assert text == uncut and last["done"] and last["eval_count"] == 16, last
            row = a.call("GET", "/api/hippo/audit?limit=1")[1]["requests"][0]
            assert row["model_source"] == "forwarded to beta, then gamma" and row["status"] == 200, row
            refused = [r for r in _forward_rows(b) if r["status"] == refusal["status"]]
            assert len(refused) == 1 and "pinned" in (refused[0]["error"] or ""), _forward_rows(b)
            # Embeddings too: beta refuses all three routes, gamma answers them.
            assert _in(a, _embeddings, a.daemon.url) == _in(g, _embeddings, g.daemon.url)
            rows = a.call("GET", "/api/hippo/audit?limit=3")[1]["requests"]
            assert [r["model_source"] for r in rows] == ["forwarded to beta, then gamma"] * 3, rows
            for pin in pins:  # beta can run smol again for the cases below
                assert b.call("POST", "/api/generate", {"model": pin, "keep_alive": 0})[0] == 200

            lines: list = []
            done = threading.Event()
            start_in_netns(a.net.ns, stream_lines, a, request, lines, done)
            tc.wait_until(lambda: len(lines) >= 4 and any(_active(n) for n in (b, g)), 60, "tokens stream")
            lost, heir = (b, g) if _active(b) else (g, b)
            cut_at = time.monotonic()
            link(lost.net, "down")
            assert done.wait(60), "the stream never ended"
            text, last = stream_text(lines)
            after = [t for t, _ in lines if t > cut_at]
            assert "error" not in last and "exception" not in last, last
            assert last["done"] and last["eval_count"] == 16, last
            assert text == uncut, (text, uncut)
            # The pause: tokens beta sent before the cut, then the silence, then the heir's replay.
            times = [cut_at] + after
            gap = max(t2 - t1 for t1, t2 in zip(times, times[1:]))
            print(f"\n[forward] link to {lost.name} down: a pause of {gap:.2f}s, then {heir.name} went on; "
                  f"the stream ended {times[-1] - cut_at:.2f}s after the cut")
            assert 4.0 < gap < 5.0 + 3.0, gap
            row = a.call("GET", "/api/hippo/audit?limit=1")[1]["requests"][0]
            assert row["model_source"] == f"forwarded to {lost.name}, then {heir.name}", row
            assert row["status"] == 200 and row["completion_tokens"] == 16, row

            # Now the heir's link drops under a long answer, and no holder is left: a clear error
            # within seconds, and the heir, whose frames go unacknowledged, cancels the job soon
            # after (its 400 tokens would take it 40 s).
            long = {**request, "options": {"temperature": 0, "num_predict": 400}}
            lines, done = [], threading.Event()
            start_in_netns(a.net.ns, stream_lines, a, long, lines, done)
            tc.wait_until(lambda: len(lines) >= 3 and _active(heir), 60, "the heir streams")
            cut_at = time.monotonic()
            link(heir.net, "down")
            assert done.wait(30), "the stream never ended"
            took = lines[-1][0] - cut_at
            error = lines[-1][1].get("error", "")
            assert f"{heir.name} went away" in error and "no other trusted peer can run smol" in error, lines[-2:]
            freed = tc.wait_until(lambda: not _active(heir), 15, f"{heir.name} cancels the job")
            print(f"[forward] no holder left: the client's error came {took:.2f}s after the cut; "
                  f"{heir.name} cancelled the job {freed:.1f}s later")
            assert took < 5.0 + 3.0, took  # the silence, and a budget question to the other, cut-off peer
        finally:
            for n in nodes:
                n.daemon.stop()


def _fill_with_pinned(node, model: str, most: int = 12) -> tuple[list[str], dict]:
    """Copies of `model` loaded with keep_alive -1 until the node's guard refuses one: then no
    other load of that size fits there. (names of the loaded copies, the refusal)"""
    pins = []
    for i in range(most):
        name = f"pin{i}"
        assert node.call("POST", "/api/copy", {"source": model, "destination": name})[0] == 200
        status, body = node.call("POST", "/api/generate", {"model": name, "keep_alive": -1})
        if status != 200:
            return pins, {"status": status, "error": body.get("error", "")}
        pins.append(name)
    raise AssertionError(f"{most} pinned copies of {model} fit on {node.name}")


def in_netns_of(node, fn, *args):
    from tests.netns import in_netns

    return in_netns(node.net.ns, fn, *args)
