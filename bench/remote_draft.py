"""Drafting on another machine over a shaped link: tokens/s of plain decoding against the same
runner drafting on a peer every round ("always": what drafting itself costs or gains at that
latency) and under the measured policy ("policy"), at several round-trip latencies, for each
request length asked (a policy that needs some rounds to decide costs less over more tokens).
The policy should track the better of plain and always: near 1.0x plain where drafting loses,
near always where it wins. `--before TREE` adds a runner from an earlier source tree (its own
policy) to the same run, so before and after are measured side by side.

    python bench/remote_draft.py --layers 8 --hidden 256 --tokens 64,128,256 --rounds 3   # CPU
    python bench/remote_draft.py --layers 32 --hidden 4096 --tokens 128,256              # on a GPU

Two network namespaces joined by a veth pair; what the peer sends is delayed by the given
round-trip time (0.2 ms is a Thunderbolt link, 3 ms Wi-Fi, 10 ms a link where drafting
clearly loses): with `tc netem` where the kernel has it, else by a relay in the peer's namespace
that holds each chunk back that long (the output says which). The target's later layers are
damped toward identity and its first layers are the draft (a model of its own, on the peer), so
acceptance is high and known without a trained pair. Rows are medians of --rounds requests
taken in turn (plain, then each drafting runner), with their range. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import make_tiny_llama  # noqa: E402
from bench.netns import in_netns, lan, sh, start_in_netns  # noqa: E402


class DelayRelay:
    """A TCP relay that forwards client -> server at once and server -> client `delay` seconds
    late (order kept): a link's round trip where the kernel lacks netem."""

    def __init__(self, address: str, upstream: int):
        self.address, self.upstream, self.delay = address, upstream, 0.0
        self.port = 0
        self.ready = None

    def serve(self) -> None:
        import threading

        self.ready = self.ready or threading.Event()
        asyncio.run(self._main())

    async def _main(self) -> None:
        server = await asyncio.start_server(self._client, self.address, 0)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _client(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection(self.address, self.upstream)
        for w in (writer, up_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()

        async def pump(src, dst, delayed: bool) -> None:
            while data := await src.read(1 << 16):
                if delayed and self.delay > 0:
                    loop.call_later(self.delay, dst.write, data)
                else:
                    dst.write(data)
            await asyncio.sleep(self.delay)
            dst.close()

        await asyncio.gather(pump(reader, up_w, False), pump(up_r, writer, True), return_exceptions=True)


def make_pair(base: Path, layers: int, hidden: int, draft_layers: int, epsilon: float) -> tuple[Path, Path]:
    """A damped target and its first `draft_layers` layers as a model of their own."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from hippod.engine.drafts import damp_layers

    raw = make_tiny_llama(base / "raw", num_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_heads=max(4, hidden // 64), num_kv_heads=max(2, hidden // 128), seed=5)
    model, _ = load(str(raw))
    damp_layers(model, draft_layers, epsilon)
    target = shutil.copytree(raw, base / "target")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "mlx"})
    draft = shutil.copytree(target, base / "draft")
    keep = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < draft_layers}
    mx.save_safetensors(str(draft / "model.safetensors"), keep, metadata={"format": "mlx"})
    cfg = json.loads((target / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": draft_layers}))
    return target, draft


def raw_mlx_lm(target: Path, prompt: str, tokens: int) -> float:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(target))
    ids = mx.array(tok.encode(prompt))
    for _ in generate_step(ids, model, max_tokens=4):
        pass
    t0, n = time.perf_counter(), 0
    for _ in generate_step(ids, model, max_tokens=tokens):
        n += 1
    return n / (time.perf_counter() - t0)


async def decode(runner, prompt: str, tokens: int) -> tuple[float, int, int, list[int]]:
    """One request: tokens per second of its decode, what it drafted and kept, its tokens."""
    from hippod.protocol import DoneEvent, GenerateRequest, TokenEvent

    req = GenerateRequest(prompt=prompt, raw=True, options={"temperature": 0, "num_predict": tokens})
    out, rate, drafted, accepted = [], 0.0, 0, 0
    async for ev in runner.generate(req):
        if isinstance(ev, TokenEvent):
            out.append(ev.token)
        elif isinstance(ev, DoneEvent):
            rate = ev.completion_tokens / max(ev.eval_seconds, 1e-9)
            drafted, accepted = ev.drafted, ev.accepted
    return rate, drafted, accepted, out


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--tokens", default="64", help="tokens per request, comma-separated")
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="requests per runner per row (median and range shown)")
    ap.add_argument("--rtt-ms", default="0.2,3,10", help="round-trip latencies to add, comma-separated")
    ap.add_argument("--before", type=Path, help="the source tree of an earlier hippo: its runner drafts on the "
                                                "same peer, a row of its own (before/after from the same run)")
    ap.add_argument("--no-local", action="store_true", help="skip the row with the draft on this machine")
    args = ap.parse_args(argv)
    from hippod.runner_process import RunnerProcess

    prompt = "the quick brown fox jumps over the lazy dog"
    counts = [int(x) for x in args.tokens.split(",")]
    rtts = [float(x) for x in args.rtt_ms.split(",")]
    base = Path(tempfile.mkdtemp(prefix="hippo-remote-draft-"))
    os.chdir(base)  # runners run `-m hippod.engine.runner`: the tree on PYTHONPATH, not the one in the cwd
    try:
        target, draft = make_pair(base, args.layers, args.hidden, args.draft_layers, args.epsilon)
        raw = raw_mlx_lm(target, prompt, max(counts))
        key = secrets.token_bytes(32)
        rows, notes, first = [], [], []
        with lan(2) as net:
            a, b = net[0], net[1]
            server = subprocess.Popen(
                ["ip", "netns", "exec", b.ns, sys.executable, "-m", "hippod.engine.remote_draft",
                 "--model", str(draft), "--bind", b.address],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env={**os.environ, "HIPPO_DRAFT_KEY": key.hex(), "PYTHONPATH": str(ROOT)})
            port = json.loads(server.stdout.readline())["port"]
            netem = subprocess.run(["ip", "netns", "exec", b.ns, "tc", "qdisc", "add", "dev", b.ifname, "root",
                                    "netem", "delay", "0ms"], capture_output=True).returncode == 0
            relay = None
            if not netem:
                import threading

                relay = DelayRelay(b.address, port)
                relay.ready = threading.Event()
                start_in_netns(b.ns, relay.serve)
                relay.ready.wait(10)
                port = relay.port

            def runner(tree: Path, extra: list[str], env: dict | None = None) -> RunnerProcess:
                return RunnerProcess(target, base, base / "runners.log", num_parallel=1, context_length=2048,
                                     extra_args=extra, extra_env={"PYTHONPATH": str(tree), **(env or {})})

            remote = ["--remote-draft", f"{b.address}:{port}", "--num-draft", str(args.num_draft)]
            keyed = {"HIPPO_DRAFT_KEY": key.hex()}

            async def measure():
                plain = runner(ROOT, [])
                peers = {"always": runner(ROOT, remote + ["--draft-policy", "always"], keyed)}
                if args.before:
                    peers["before"] = runner(args.before.resolve(), remote, keyed)
                peers["policy"] = runner(ROOT, remote + ["--draft-policy", "measured"], keyed)
                local = None if args.no_local else runner(
                    ROOT, ["--draft", str(draft), "--num-draft", str(args.num_draft)])
                started = [plain, *peers.values()] + ([local] if local else [])
                for r in started:
                    await r.start(300)
                def delay(rtt: float) -> None:
                    if netem:
                        sh("ip", "netns", "exec", b.ns, "tc", "qdisc", "replace", "dev", b.ifname,
                           "root", "netem", "delay", f"{rtt}ms")
                    else:
                        relay.delay = rtt / 1000

                try:
                    # The policy runner's very first request, before it has measured anything.
                    delay(rtts[0])
                    await decode(plain, prompt, 8)
                    first.append(await decode(peers["policy"], prompt, counts[0]))
                    for n in counts:
                        blocks = [(rtt, peers) for rtt in rtts] + ([(None, {"local policy": local})] if local else [])
                        for rtt, group in blocks:
                            if rtt is not None:
                                delay(rtt)
                            for r in group.values():
                                await decode(r, prompt, 8)  # a new stream: a new session at this latency
                            got = {name: [] for name in ["plain", *group]}
                            expected = None
                            for _ in range(args.rounds):  # interleaved, so the box's noise falls on all
                                tps, d, k, out = await decode(plain, prompt, n)
                                expected = out
                                got["plain"].append((tps, d, k, True))
                                for name, r in group.items():
                                    tps, d, k, out = await decode(r, prompt, n)
                                    got[name].append((tps, d, k, out == expected))
                            base_tps = _median([g[0] for g in got["plain"]])
                            for name, results in got.items():
                                rates = [g[0] for g in results]
                                rows.append((n, rtt, name, _median(rates), min(rates), max(rates),
                                             _median(rates) / base_tps, _median([g[1] for g in results]),
                                             _median([g[2] for g in results]), all(g[3] for g in results)))
                            if "policy" in group:
                                info = await group["policy"].info()
                                notes.append((n, rtt, (info.admission or {}).get("draft_policy")))
                finally:
                    for r in started:
                        await r.stop()

            try:
                in_netns(a.ns, asyncio.run, measure())
            finally:
                server.kill()
        print(f"target {args.layers} layers x {args.hidden}, draft its first {args.draft_layers} layers on the "
              f"peer, epsilon {args.epsilon}, num_draft {args.num_draft}, {args.rounds} requests per row "
              f"(median, min-max), greedy")
        print(f"raw mlx_lm generate_step: {raw:.1f} tok/s; link delay by {'tc netem' if netem else 'a delaying relay'}")
        print("runners: plain (no draft); always (draft on the peer every round); "
              + ("before (the earlier tree's policy); " if args.before else "")
              + "policy (the measured policy); local policy (the draft on this machine, measured policy)")
        print("| tokens | RTT ms | runner | tok/s | min-max | × plain | drafted | accepted | same as plain |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n, rtt, name, med, lo, hi, ratio, drafted, accepted, same in rows:
            print(f"| {n} | {'-' if rtt is None else f'{rtt:g}'} | {name} | {med:.1f} | {lo:.1f}-{hi:.1f} | "
                  f"{ratio:.2f} | {drafted:g} | {accepted:g} | {'yes' if same else 'NO'} |")
        tps, drafted, accepted, _ = first[0]
        plain_row = next(r for r in rows if r[0] == counts[0] and r[1] == rtts[0] and r[2] == "plain")
        print(f"\nthe policy runner's first request ({counts[0]} tokens at {rtts[0]:g} ms, nothing measured yet): "
              f"{tps:.1f} tok/s, {tps / plain_row[3]:.2f} x that row's plain median, drafted {drafted}, "
              f"accepted {accepted}")
        print("\nthe policy's knowledge after each row (seconds; t_round by drafts asked):")
        for n, rtt, state in notes:
            if state:
                rounds = ", ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in state["t_round"].items())
                print(f"- {n} tokens, {rtt:g} ms: plain {state['t_plain'] * 1e3:.0f} ms, rounds {{{rounds}}}, "
                      f"alpha {state['alpha']:.2f}, best k {state['best_drafts']}, on {state['on']}, "
                      f"probes {state['probes']}, gap {state['probe_gap']}")
        return 0 if all(r[-1] for r in rows) else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
