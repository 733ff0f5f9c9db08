"""Drafting on another machine: a draft server in one network namespace, the target's runner in
another, joined by a veth pair. Output must be plain greedy output, with the peer and after
losing it mid-stream; a connection that cannot prove the session key is refused."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from hippod.protocol import DoneEvent, GenerateRequest, TokenEvent
from hippod.runner_process import RunnerProcess
from tests.test_speculative import dirs  # noqa: F401  (the target and its 2-layer draft)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

KEY = secrets.token_bytes(32)


def start_draft_server(ns: str, model, address: str, key: bytes = KEY,
                       allow: str | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "hippod.engine.remote_draft",
         "--model", str(model), "--bind", address, *(["--allow", allow] if allow else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "HIPPO_DRAFT_KEY": key.hex(), "PYTHONUNBUFFERED": "1"})
    ready = json.loads(proc.stdout.readline())
    return proc, ready["port"]


def request(prompt: str, n: int) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, raw=True, options={"temperature": 0, "num_predict": n})


async def generate(runner: RunnerProcess, req: GenerateRequest, on_token=None) -> tuple[list[int], DoneEvent]:
    tokens, done = [], None
    async for ev in runner.generate(req):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
            if on_token is not None:
                on_token(len(tokens))
        elif isinstance(ev, DoneEvent):
            done = ev
    return tokens, done


def runner_for(model, tmp, remote: str | None = None, key: bytes = KEY, policy: str = "always") -> RunnerProcess:
    args, env = [], {}
    if remote:
        args, env = (["--remote-draft", remote, "--num-draft", "3", "--draft-policy", policy],
                     {"HIPPO_DRAFT_KEY": key.hex()})
    return RunnerProcess(model, tmp, tmp / "runners.log", num_parallel=1, context_length=2048,
                         extra_args=args, extra_env=env)


PROMPTS = ("the quick brown fox", "one two three four five")


def test_drafts_from_a_peer_give_plain_output_and_losing_it_changes_nothing(dirs, tmp_path):
    from tests.netns import in_netns, lan

    with lan(2) as net:
        a, b = net[0], net[1]
        server, port = start_draft_server(b.ns, dirs["draft"], b.address, allow=a.address)

        async def main():
            plain = runner_for(dirs["target"], tmp_path)
            remote = runner_for(dirs["target"], tmp_path, f"{b.address}:{port}")
            measured = runner_for(dirs["target"], tmp_path, f"{b.address}:{port}", policy="measured")
            await plain.start(120)
            await remote.start(120)
            await measured.start(120)
            try:
                out = {}
                for prompt in PROMPTS:
                    expected, _ = await generate(plain, request(prompt, 24))
                    got, done = await generate(remote, request(prompt, 24))
                    out[prompt] = (expected, got, done)
                # The measured policy drafts some rounds and not others, and keeps what it
                # learnt for the next request: the tokens are still the plain ones.
                by_policy = []
                for prompt in PROMPTS * 2:
                    expected, _ = await generate(plain, request(prompt, 24))
                    got, done = await generate(measured, request(prompt, 24))
                    by_policy.append((expected, got, done))
                policy = (await measured.info()).admission["draft_policy"]
                await measured.stop()
                # The peer's link goes down mid-stream, then its draft server dies: both streams
                # finish here with the plain tokens.
                long_plain, _ = await generate(plain, request(PROMPTS[0], 40))
                cut_at = []

                def cut(count):
                    if count == 4 and not cut_at:
                        cut_at.append(count)
                        subprocess.run(["ip", "-n", b.ns, "link", "set", b.ifname, "down"], check=True)
                t0 = time.monotonic()
                after_cut, cut_done = await generate(remote, request(PROMPTS[0], 40), cut)
                cut_seconds = time.monotonic() - t0
                subprocess.run(["ip", "-n", b.ns, "link", "set", b.ifname, "up"], check=True)
                server.send_signal(signal.SIGKILL)
                server.wait()
                after_kill, _ = await generate(remote, request(PROMPTS[0], 40))
                return out, by_policy, policy, long_plain, after_cut, cut_done, cut_seconds, after_kill
            finally:
                await measured.stop()
                await remote.stop()
                await plain.stop()

        try:
            out, by_policy, policy, long_plain, after_cut, cut_done, cut_seconds, after_kill = \
                in_netns(a.ns, asyncio.run, main())
        finally:
            server.kill()
    for prompt, (expected, got, done) in out.items():
        assert got == expected, prompt
        assert done.drafted > 0 and done.accepted > 0, (prompt, done)
    assert all(got == expected for expected, got, _ in by_policy)
    assert by_policy[0][2].drafted > 0  # the first request measures what drafting costs
    assert policy["t_plain"] > 0 and policy["t_round"], policy
    assert after_cut == long_plain and len(after_cut) == 40
    assert 0 < cut_done.drafted  # it drafted on the peer before the cut
    assert cut_seconds < 20  # one round's timeout, not a hang
    assert after_kill == long_plain
    # The peer was lost once; the next stream did not try (and wait for) it again.
    assert (tmp_path / "runners.log").read_text().count("going on without it") == 1


def test_a_connection_without_the_session_key_is_refused(dirs, tmp_path):
    from hippod.engine import remote_draft as rd
    from tests.netns import in_netns, lan

    with lan(2) as net:
        a, b = net[0], net[1]
        server, port = start_draft_server(b.ns, dirs["draft"], b.address, allow=a.address)

        def probe(answer: bytes | None) -> bytes:
            sock = socket.create_connection((b.address, port), timeout=10)
            try:
                challenge = rd._recv_exact(sock, rd.CHALLENGE_BYTES)
                if answer is not None:
                    sock.sendall(answer if answer else rd.proof(secrets.token_bytes(32), challenge))
                    rd.send_frame(sock, rd._HEAD.pack(0, 3, 1, 1) + rd._pack([2]))
                return closed_or_answer(sock)
            finally:
                sock.close()

        def good_round() -> list[int]:
            sock = socket.create_connection((b.address, port), timeout=10)
            try:
                sock.sendall(rd.proof(KEY, rd._recv_exact(sock, rd.CHALLENGE_BYTES)))
                rd.send_frame(sock, rd._HEAD.pack(0, 3, 5, 2) + rd._pack([1, 2]))
                first = rd._ids(rd.recv_frame(sock))
                rd.send_frame(sock, rd._HEAD.pack(7, 3, 5, 0))  # more kept than drafted: dropped
                return first, closed_or_answer(sock)
            finally:
                sock.close()

        def closed_or_answer(sock) -> bytes:
            try:
                return sock.recv(64)  # b"": closed without an answer
            except ConnectionResetError:  # closed with our frame unread
                return b""

        try:
            assert in_netns(a.ns, probe, b"") == b""  # a wrong key
            assert in_netns(a.ns, probe, b"\0" * 5) == b""  # a short answer, then silence
            # A silent stranger holds no one up: a proven session is served meanwhile.
            silent = in_netns(a.ns, socket.create_connection, (b.address, port), 10)
            t0 = time.monotonic()
            first, after_bad = in_netns(a.ns, good_round)
            assert time.monotonic() - t0 < 2.5
            silent.close()
            assert len(first) == 3 and after_bad == b""
            # From any address but the target's, a connection is closed before its challenge:
            # more of them than the pending slots hold nobody up either.
            strangers = [in_netns(b.ns, socket.create_connection, (b.address, port), 10)
                         for _ in range(rd.MAX_PENDING + 2)]
            try:
                assert [closed_or_answer(s) for s in strangers] == [b""] * len(strangers)
                t0 = time.monotonic()
                first, _ = in_netns(a.ns, good_round)
                assert len(first) == 3 and time.monotonic() - t0 < 2.5
            finally:
                for s in strangers:
                    s.close()
            # A wildcard bind is refused: the server listens on the cluster address only.
            bad = subprocess.run([sys.executable, "-m", "hippod.engine.remote_draft", "--model",
                                  str(dirs["draft"]), "--bind", "0.0.0.0"],
                                 env={**os.environ, "HIPPO_DRAFT_KEY": KEY.hex()}, capture_output=True, text=True)
            assert bad.returncode == 2 and "wildcard" in json.loads(bad.stdout)["error"]
        finally:
            server.kill()


def start_with_draft_on_both(a, b, dirs) -> None:
    """Start both daemons; both hold the draft `drf`, alpha `plain` and `tgt` (which drafts with drf)."""
    from tests import test_cluster as tc

    a.start()
    b.start()
    tc.wait_until(lambda: tc.trusted_and_fresh(a, b) and tc.trusted_and_fresh(b, a), 20, "both trust each other")
    for node in (a, b):
        assert node.call("POST", "/api/create", {"model": "drf", "from": str(dirs["draft"]), "stream": False})[0] == 200
    for name, extra in (("plain", {}), ("tgt", {"draft": "drf"})):
        assert a.call("POST", "/api/create", {"model": name, "from": str(dirs["target"]), "stream": False,
                                              **extra})[0] == 200


def generate_on(node, model: str, prompt: str) -> dict:
    status, body = node.call("POST", "/api/generate", {
        "model": model, "prompt": prompt, "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 16}})
    assert status == 200, body
    return body


def test_hippoctl_run_draft_on_a_peer_over_two_daemons(dirs, tmp_path, monkeypatch):
    """The whole path: `hippoctl run --draft-on beta` pins the draft to beta; alpha's next load
    opens a signed draft session there; output is plain greedy output; /api/ps on both sides
    shows where each part runs; a dead draft server only costs the drafts until a later
    request reopens a session."""
    import io
    import urllib.error
    import urllib.request

    from hippoctl import main as ctl
    from hippoctl.client import HippoError
    from tests import test_cluster as tc
    from tests.netns import in_netns, lan
    from tests.test_pipeline import Pair

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with lan(2) as net:
        pair = Pair(net, tmp_path, {"HIPPO_NUM_CTX": "1024", "HIPPO_DRAFT_POLICY": "always"}, {"HIPPO_NUM_CTX": "1024"})
        a, b = pair.a, pair.b
        try:
            start_with_draft_on_both(a, b, dirs)

            def gen(model, prompt):
                return generate_on(a, model, prompt)

            expected = [gen("plain", p)["response"] for p in PROMPTS]
            run = dict(temperature=0.0, seed=None, num_predict=8, keep_alive=None, verbose=False, nodes=None)
            with pytest.raises(HippoError, match="no trusted peer named 'gamma'"):
                a.cli(ctl.run, model="tgt", prompt=["hi"], draft_on="gamma", **run)
            with pytest.raises(HippoError, match="has no draft"):
                a.cli(ctl.run, model="plain", prompt=["hi"], draft_on="beta", **run)
            a.cli(ctl.run, model="tgt", prompt=["hi"], draft_on="beta", **run)
            got = [gen("tgt", p) for p in PROMPTS]
            assert [g["response"] for g in got] == expected
            assert all(g["draft_count"] > 0 for g in got) and sum(g["draft_accepted_count"] for g in got) > 0
            mine = [m for m in a.call("GET", "/api/ps")[1]["models"] if m["name"] == "tgt:latest"]
            assert mine[0]["hippo"]["draft"]["node"] == "beta"
            assert mine[0]["hippo"]["draft"]["address"].startswith(b.net.address + ":")
            assert "tgt:latest drafts with drf:latest on beta" in a.cli(ctl.ps, json=False, history=False, limit=20)
            hosted = b.call("GET", "/api/ps")[1]["hippo"]["drafts"]
            assert [(h["model"], h["running"]) for h in hosted] == [("drf:latest", True)]

            # The peer's draft server dies: the answers stay the same, only without drafts.
            os.kill(hosted[0]["pid"], signal.SIGKILL)
            assert [gen("tgt", p)["response"] for p in PROMPTS] == expected

            # The peer reports the session gone: a later request reloads here and opens a new one.
            def drafts_again():
                again = gen("tgt", PROMPTS[0])
                assert again["response"] == expected[0]
                return again.get("draft_count", 0) > 0
            tc.wait_until(drafts_again, 30, "a new draft session")
            reopened = b.call("GET", "/api/ps")[1]["hippo"]["drafts"]
            assert [(h["running"], h["pid"] != hosted[0]["pid"]) for h in reopened] == [(True, True)]

            # Peer routes are signed like every peer route: an unsigned open is refused unread.
            req = urllib.request.Request(b.daemon.url + "/api/hippo/peer/draft/open",
                                         data=b'{"model": "drf"}', method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                in_netns(a.net.ns, urllib.request.urlopen, req, timeout=10)
            assert refused.value.code == 403

            # Unpinned: the next load drafts here again, and the peer's session is closed.
            a.cli(ctl.run, model="tgt", prompt=["hi"], draft_on="off", **run)
            tc.wait_until(lambda: "hippo" not in b.call("GET", "/api/ps")[1], 15, "the peer's draft session closed")

            # The same as a request option (or a Modelfile parameter): `draft_on`.
            status, body = a.call("POST", "/api/generate", {"model": "tgt", "prompt": PROMPTS[0], "raw": True,
                                                            "stream": False, "options": {"draft_on": 7}})
            assert status == 400 and "draft_on" in body["error"]
            status, body = a.call("POST", "/api/generate", {
                "model": "tgt", "prompt": PROMPTS[0], "raw": True, "stream": False,
                "options": {"draft_on": "beta", "temperature": 0, "num_predict": 16}})
            assert status == 200 and body["response"] == expected[0] and body["draft_count"] > 0
            mine = [m for m in a.call("GET", "/api/ps")[1]["models"] if m["name"] == "tgt:latest"]
            assert mine[0]["hippo"]["draft"]["node"] == "beta"
            status, body = a.call("POST", "/api/generate", {"model": "plain", "prompt": "x", "stream": False,
                                                            "options": {"draft_on": "beta"}})
            assert status == 400 and "has no draft" in body["error"]

            # ... and as a model's setting (a Modelfile parameter).
            assert a.call("POST", "/api/create", {"model": "tgt2", "from": str(dirs["target"]), "stream": False,
                                                  "draft": "drf", "parameters": {"draft_on": "beta"}})[0] == 200
            assert gen("tgt2", PROMPTS[1])["response"] == expected[1]
            mine = [m for m in a.call("GET", "/api/ps")[1]["models"] if m["name"] == "tgt2:latest"]
            assert mine[0]["hippo"]["draft"]["node"] == "beta"
        finally:
            pair.stop()


def test_a_draft_that_does_not_fit_here_runs_on_the_peer_that_holds_it(dirs, tmp_path):
    """No --draft-on: alpha's budget holds the target, not the target and its draft; beta holds
    the draft and advertises room, so the load drafts there. Output is plain greedy output."""
    from hippod.registry.modelinfo import inspect_model_dir
    from tests import test_cluster as tc
    from tests.netns import lan
    from tests.test_pipeline import Pair
    from tests.test_scheduler import NUM_CTX, NUM_PARALLEL, expected_estimate

    budget = expected_estimate(dirs["target"]) + inspect_model_dir(dirs["draft"]).weights_bytes // 2
    with lan(2) as net:
        pair = Pair(net, tmp_path, {"HIPPO_MEMORY_BUDGET": str(budget), "HIPPO_NUM_CTX": str(NUM_CTX),
                                    "HIPPO_NUM_PARALLEL": str(NUM_PARALLEL), "HIPPO_DRAFT_POLICY": "always"}, {})
        a, b = pair.a, pair.b
        try:
            start_with_draft_on_both(a, b, dirs)
            tc.wait_until(lambda: any("drf:latest" in (p.get("models") or [])
                                      for p in a.call("GET", "/api/hippo/nodes")[1]["nodes"]), 20,
                          "alpha sees that beta holds the draft")

            def gen(model, prompt):
                return generate_on(a, model, prompt)

            expected = [gen("plain", p)["response"] for p in PROMPTS]
            got = [gen("tgt", p) for p in PROMPTS]
            assert [g["response"] for g in got] == expected
            assert all(g.get("draft_count", 0) > 0 for g in got), got
            mine = [m for m in a.call("GET", "/api/ps")[1]["models"] if m["name"] == "tgt:latest"]
            assert mine[0]["hippo"]["draft"]["node"] == "beta" and mine[0]["hippo"]["draft"]["chosen"] == "auto"
            hosted = b.call("GET", "/api/ps")[1]["hippo"]["drafts"]
            assert [(h["model"], h["running"]) for h in hosted] == [("drf:latest", True)]
        finally:
            pair.stop()
