"""Forwarding: a request for a model this node cannot run goes to a trusted peer that holds it.

The two-daemon test runs alpha (a memory budget too small for the model) and beta (which holds
it) on a private LAN: requests to alpha in both APIs and both delivery modes stream beta's
answer, alpha's audit log says so, a client that leaves cancels beta's job, beta vanishing ends
the stream with an error, and forged forward requests to beta are refused before anything runs.
The loopback test puts a tampering proxy between a forwarding node and a real daemon.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import ollama
import openai
import pytest
from aiohttp import ClientSession, web

from hippod.cluster import forward, planner, trust
from hippod.protocol import (FORWARD_PATH, DoneEvent, ForwardRequest, ForwardStart, GenerateRequest,
                             SplitRecordError, TokenEvent, decode_forward, decode_frame, forward_body)
from hippod.runners import Forward
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
    for bad, param in (({**body, "model": ""}, "model"), ({**body, "keep_alive": True}, "keep_alive"),
                       ({**body, "request": {"resume": [1, 2]}}, "request"),
                       ({**body, "request": {"prompt": 5}}, "request.prompt"),
                       ({**body, "request": {"logprobs": True}}, "request.logprobs"),
                       ({**body, "request": {"messages": [{"role": "user", "content": 3}]}}, "request.messages"),
                       ({**body, "request": {"grammar": {"regex": "x"}}}, "request.grammar"),
                       ({**body, "request": {"tool_choice": "sometimes"}}, "request.tool_choice")):
        with pytest.raises(SplitRecordError) as e:
            decode_forward(bad)
        assert e.value.param == param, (bad, e.value)

    secret = trust.new_secret()
    beta, alpha = trust.Keyring("beta-id", secret), trust.Keyring("alpha-id", secret)
    signer = forward.FrameSigner(beta, "nonce-1")
    lines = [signer.line(ForwardStart("smol:latest", "d" * 64)), signer.line(TokenEvent("Paris", 7))]
    frames = [decode_frame(line) for line in lines]
    assert [f.seq for f in frames] == [0, 1]
    assert all(alpha.verify_frame("nonce-1", f.seq, f.data, f.mac, "beta-id") for f in frames)
    f = frames[1]
    assert not alpha.verify_frame("nonce-2", f.seq, f.data, f.mac, "beta-id")  # another request's frame
    assert not alpha.verify_frame("nonce-1", 0, f.data, f.mac, "beta-id")  # moved to another place
    assert not alpha.verify_frame("nonce-1", f.seq, f.data.replace("Paris", "Pwned"), f.mac, "beta-id")
    assert not alpha.verify_frame("nonce-1", f.seq, f.data, f.mac, "alpha-id")  # not beta's
    stranger = trust.Keyring("beta-id", trust.new_secret())
    forged = forward.FrameSigner(stranger, "nonce-1")
    forged.seq = 1
    g = decode_frame(forged.line(TokenEvent("Pwned", 7)))
    assert not alpha.verify_frame("nonce-1", g.seq, g.data, g.mac, "beta-id")


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


# -- a tampering proxy between a forwarding node and a real daemon ------------------------------


class _Peers:
    def __init__(self, peer: PeerRecord):
        self.peer = peer

    def find(self, ref: str) -> PeerRecord | None:
        return self.peer if ref == self.peer.name else None


class _Forwarder:
    """What forward.stream needs of a cluster: a keyring holding the secret and a peer table."""

    def __init__(self, keyring: trust.Keyring, peer: PeerRecord):
        self.keyring = keyring
        self.peers = _Peers(peer)


async def _proxy(upstream: str, mangle) -> tuple[web.AppRunner, int]:
    """Passes a forward request on unchanged; `mangle(index, line)` rewrites each answer line
    (None drops it, "CUT" ends the answer there)."""
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
                if out is not None:
                    await resp.write(out)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post(FORWARD_PATH, handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app)
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


@pytest.mark.slow
def test_a_tampered_dropped_or_cut_answer_frame_is_detected(tmp_path):
    secret = trust.new_secret()
    with Daemon(tmp_path / "beta", env={"HIPPO_CLUSTER_SECRET": secret, "HIPPO_NUM_CTX": "512",
                                        "HIPPO_NODE_NAME": "beta"}) as beta:
        status, body = beta.request("POST", "/api/create", {"model": "smol", "from": str(smollm2_mlx_dir()),
                                                            "stream": False})
        assert status == 200, body
        beta_id = (beta.home / "node-id").read_text().strip()
        keyring = trust.Keyring("alpha-" + "0" * 8, secret)
        request = GenerateRequest(prompt="The capital of France is", raw=True,
                                  options={"temperature": 0, "num_predict": 6})

        async def run(mangle) -> tuple[list, str | None]:
            runner, port = await _proxy(beta.url, mangle)
            peer = PeerRecord(node_id=beta_id, name="beta", addresses=["127.0.0.1"], port=port, memory_total=0,
                              memory_free=0, version="test", trusted=True)
            events, error = [], None
            try:
                async with ClientSession() as session:
                    try:
                        async for ev in forward.stream(_Forwarder(keyring, peer), session, Forward("beta"),
                                                       "smol", request, None, read_timeout=120):
                            events.append(ev)
                    except forward.ForwardError as e:
                        error = str(e)
            finally:
                await runner.cleanup()
            return events, error

        events, error = asyncio.run(run(lambda i, line: line))
        assert error is None, error
        assert isinstance(events[0], ForwardStart) and events[0].model == "smol:latest"
        assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 6
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert text and "HACKED" not in text

        for mangle, says in ((_swap_text, "failed authentication at frame 2"),
                             (lambda i, line: None if i == 2 else line, "failed authentication at frame 2"),
                             (lambda i, line: "CUT" if i == 3 else line, "went away mid-answer")):
            events, error = asyncio.run(run(mangle))
            assert error is not None and says in error, error
            assert not any(isinstance(e, TokenEvent) and "HACKED" in e.text for e in events)
            assert not any(isinstance(e, DoneEvent) for e in events)


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

            # Beta vanishing mid-stream ends alpha's stream with an error that says so.
            lines = []
            t = threading.Thread(target=_in, args=(a, _stream, a.daemon.url + "/api/generate", body, None, lines))
            t.start()
            wait_until(lambda: len(lines) >= 3, 60, "tokens arrive from beta")
            b.daemon.kill()
            t.join(60)
            assert not t.is_alive()
            assert "error" in lines[-1] and "beta went away" in lines[-1]["error"], lines[-3:]
            assert not any(line.get("done") for line in lines)
            row = a.call("GET", "/api/hippo/audit?limit=1")[1]["requests"][0]
            assert row["model_source"] == "forwarded to beta" and "went away" in (row["error"] or ""), row
        finally:
            pair.stop()


def _secret(node) -> str:
    return trust.load_secret(node.daemon.env["HIPPO_CLUSTER_SECRET"], node.home)
