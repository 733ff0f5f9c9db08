"""Drafting on another machine over a shaped link: tokens/s with the draft on a peer, against
plain decoding of the same runner, the same draft on this machine, and raw mlx_lm, at several
round-trip latencies (the "× local draft" column is why an unpinned draft goes to a peer only
when it does not fit here).

    sudo python bench/remote_draft.py --layers 8 --hidden 256 --tokens 64       # CPU smoke run
    sudo python bench/remote_draft.py --layers 32 --hidden 4096 --tokens 128    # on a GPU

Two network namespaces joined by a veth pair; what the peer sends is delayed by the given
round-trip time (0.2 ms is a Thunderbolt link, 3 ms Wi-Fi): with `tc netem` where the kernel has
it, else by a relay in the peer's namespace that holds each chunk back that long (the reported
"link" column says which). The target's later layers
are damped toward identity and its first layers are the draft (a model of its own, on the
peer), so acceptance is high and known without a trained pair. The policy must turn drafting
off where it does not pay: then the ratio stays near 1.0 and the drafted count stays small.
Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
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


async def decode(runner, prompt: str, tokens: int, rounds: int) -> tuple[float, int, int, list[int]]:
    from hippod.protocol import DoneEvent, GenerateRequest, TokenEvent

    best, drafted, accepted, out = 0.0, 0, 0, []
    for _ in range(rounds):
        req = GenerateRequest(prompt=prompt, raw=True, options={"temperature": 0, "num_predict": tokens})
        out = []
        async for ev in runner.generate(req):
            if isinstance(ev, TokenEvent):
                out.append(ev.token)
            elif isinstance(ev, DoneEvent):
                best = max(best, ev.completion_tokens / max(ev.eval_seconds, 1e-9))
                drafted, accepted = ev.drafted, ev.accepted
    return best, drafted, accepted, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rtt-ms", default="0.2,3", help="round-trip latencies to add, comma-separated")
    args = ap.parse_args(argv)
    from hippod.runner_process import RunnerProcess

    prompt = "the quick brown fox jumps over the lazy dog"
    base = Path(tempfile.mkdtemp(prefix="hippo-remote-draft-"))
    try:
        target, draft = make_pair(base, args.layers, args.hidden, args.draft_layers, args.epsilon)
        raw = raw_mlx_lm(target, prompt, args.tokens)
        key = secrets.token_bytes(32)
        rows, here = [], []  # here: (tok/s, same) with the same draft on this machine
        with lan(2) as net:
            a, b = net[0], net[1]
            server = subprocess.Popen(
                ["ip", "netns", "exec", b.ns, sys.executable, "-m", "hippod.engine.remote_draft",
                 "--model", str(draft), "--bind", b.address],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "HIPPO_DRAFT_KEY": key.hex()})
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

            async def measure():
                plain = RunnerProcess(target, base, base / "runners.log", num_parallel=1, context_length=2048)
                local = RunnerProcess(target, base, base / "runners.log", num_parallel=1, context_length=2048,
                                      extra_args=["--draft", str(draft), "--num-draft", str(args.num_draft)])
                remote = RunnerProcess(target, base, base / "runners.log", num_parallel=1, context_length=2048,
                                       extra_args=["--remote-draft", f"{b.address}:{port}",
                                                   "--num-draft", str(args.num_draft)],
                                       extra_env={"HIPPO_DRAFT_KEY": key.hex()})
                await plain.start(300)
                await remote.start(300)
                await local.start(300)
                try:
                    base_tps, _, _, plain_out = await decode(plain, prompt, args.tokens, args.rounds)
                    local_tps, _, _, local_out = await decode(local, prompt, args.tokens, args.rounds)
                    here.append((local_tps, local_out == plain_out))
                    for rtt in [float(x) for x in args.rtt_ms.split(",")]:
                        if netem:
                            sh("ip", "netns", "exec", b.ns, "tc", "qdisc", "replace", "dev", b.ifname, "root",
                               "netem", "delay", f"{rtt}ms")
                        else:
                            relay.delay = rtt / 1000
                        await decode(remote, prompt, 8, 1)  # a new stream: a new session at this latency
                        tps, drafted, accepted, out = await decode(remote, prompt, args.tokens, args.rounds)
                        rows.append((rtt, base_tps, tps, drafted, accepted, out == plain_out))
                finally:
                    await local.stop()
                    await remote.stop()
                    await plain.stop()

            try:
                in_netns(a.ns, asyncio.run, measure())
            finally:
                server.kill()
        print(f"target {args.layers} layers x {args.hidden}, draft its first {args.draft_layers} layers on the "
              f"peer, epsilon {args.epsilon}, {args.tokens} tokens, num_draft {args.num_draft}, best of {args.rounds}")
        print(f"raw mlx_lm generate_step: {raw:.1f} tok/s; link delay by {'tc netem' if netem else 'a delaying relay'}")
        local_tps, local_same = here[0]
        print(f"the same draft on this machine: {local_tps:.1f} tok/s "
              f"({'same' if local_same else 'NOT the same'} output)")
        print("| RTT ms | plain tok/s | remote-draft tok/s | × plain | × mlx_lm | × local draft | drafted | accepted | same |")
        print("|---|---|---|---|---|---|---|---|---|")
        for rtt, base_tps, tps, drafted, accepted, same in rows:
            print(f"| {rtt:g} | {base_tps:.1f} | {tps:.1f} | {tps / base_tps:.2f} | {tps / raw:.2f} | "
                  f"{tps / local_tps:.2f} | {drafted} | {accepted} | {'yes' if same else 'NO'} |")
        return 0 if all(r[-1] for r in rows) and local_same else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
