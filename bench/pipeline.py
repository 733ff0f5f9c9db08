"""A model split over two hippods vs the same model on one: two daemons in network namespaces.

    sudo python bench/pipeline.py                     # SmolLM2-135M, 15/15 layers, this CPU
    sudo python bench/pipeline.py --model DIR --tokens 64 --streams 8 --history 1000

Two daemons (alpha and beta) run in their own network namespaces joined by a veth pair, trust
each other through a shared cluster secret, and serve the same model from alpha: "one node" is
alpha alone, "split" is the placement alpha,beta (alpha runs the first half of the layers and
samples, beta the rest). Every number is measured in this one run:

  - raw mlx_lm: stream_generate in this process before the daemons start (the reference);
  - 1 stream: decode tok/s from the done line's eval_count / eval_duration, median of rounds;
  - N streams: N concurrent greedy requests, aggregate tokens / wall seconds;
  - chat turn 2: time to first token of a chat's next turn over a history of --history tokens,
    against the first turn's (the split keeps every rank's KV cache of the last sequence);
  - peer cut: beta's link goes down mid-stream; the pause before the next token, and whether
    the greedy answer equals the uncut split's.

Needs root (network namespaces). On a shared 2-core box all of it is noisy; the ratios matter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon  # noqa: E402
from bench.netns import in_netns, lan, sh, start_in_netns  # noqa: E402

STORY = "Write a long story about a lighthouse keeper who finds a map in a bottle."


class Node:
    def __init__(self, net, home: Path, name: str, env: dict):
        self.net = net
        self.name = name
        self.daemon = Daemon(home, host=net.address, netns=net.ns, args=["--insecure"],
                             env={"HIPPO_DISCOVERY": "true", "HIPPO_NODE_NAME": name, **env})

    def call(self, method: str, path: str, body=None, timeout: float = 600):
        return in_netns(self.net.ns, self.daemon.request, method, path, body, timeout)

    def stream(self, path: str, body: dict, lines: list | None = None, cut=None) -> list:
        """POST a streaming body; (time.monotonic(), parsed line) for every line, after a first
        (request sent at, {})."""
        lines = [] if lines is None else lines

        def run():
            req = urllib.request.Request(self.daemon.url + path, data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            lines.append((time.monotonic(), {}))
            with urllib.request.urlopen(req, timeout=600) as resp:
                for raw in resp:
                    if raw.strip():
                        lines.append((time.monotonic(), json.loads(raw)))
                        if cut is not None and len(lines) == cut[0] + 1:
                            cut[1].set()
            return lines

        return in_netns(self.net.ns, run)


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting until {what}")


def trusted(a: Node, b: Node) -> bool:
    status, body = a.call("GET", "/api/hippo/nodes")
    return status == 200 and any(n["name"] == b.name and n["trusted"] and not n["stale"] for n in body["nodes"])


def place(a: Node, nodes: list[str] | None) -> None:
    status, body = a.call("POST", "/api/hippo/placement", {"model": "m", "nodes": nodes})
    assert status == 200, body
    a.call("POST", "/api/generate", {"model": "m", "keep_alive": 0})  # unload: the next load follows it
    wait_until(lambda: not a.daemon.runner_pids(), 30, "the model unloaded")


def generate(a: Node, tokens: int, i: int) -> dict:
    status, body = a.call("POST", "/api/chat", {
        "model": "m", "messages": [{"role": "user", "content": f"{i}. {STORY}"}], "stream": False,
        "options": {"temperature": 0, "num_predict": tokens}})
    assert status == 200, body
    return body


def decode_rate(a: Node, tokens: int, rounds: int) -> float:
    generate(a, 4, -1)  # load and warm up
    rates = []
    for i in range(rounds):
        body = generate(a, tokens, i)
        rates.append((body["eval_count"] - 1) / (body["eval_duration"] / 1e9))
    return statistics.median(rates)


def aggregate(a: Node, tokens: int, streams: int) -> float:
    generate(a, 4, -1)
    results: list = [None] * streams
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, generate(a, tokens, 100 + i)))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r["eval_count"] for r in results) / (time.monotonic() - t0)


def chat_turns(a: Node, history_tokens: int, tokens: int) -> tuple[float, float, dict]:
    """TTFT of turn 1 over a long history, then of turn 2 that extends it."""
    filler = " ".join(f"Note {i}: the keeper logged the weather and the ships that passed." for i in
                      range(max(history_tokens // 14, 1)))
    messages = [{"role": "system", "content": "You are a helpful assistant. " + filler},
                {"role": "user", "content": "Summarise the log in one line."}]

    def ttft(msgs) -> tuple[float, str, dict]:
        lines = a.stream("/api/chat", {"model": "m", "messages": msgs,
                                       "options": {"temperature": 0, "num_predict": tokens}})
        first = next(t for t, body in lines if body.get("message", {}).get("content") or body.get("done"))
        text = "".join(body.get("message", {}).get("content", "") for _, body in lines)
        return first - lines[0][0], text, lines[-1][1]

    generate(a, 4, -1)
    t1, answer, done1 = ttft(messages)
    t2, _, done2 = ttft(messages + [{"role": "assistant", "content": answer},
                                    {"role": "user", "content": "And which ship came most often?"}])
    return t1, t2, {"turn1_prompt": done1.get("prompt_eval_count"), "turn2_prompt": done2.get("prompt_eval_count")}


def peer_cut(a: Node, b: Node, tokens: int) -> tuple[float, bool, str]:
    body = {"model": "m", "prompt": "Once upon a time", "raw": True,
            "options": {"temperature": 0, "num_predict": tokens}}
    uncut = "".join(x.get("response", "") for _, x in a.stream("/api/generate", body))
    lines: list = []
    reached = threading.Event()
    start_in_netns(a.net.ns, lambda: a.stream("/api/generate", body, lines, (6, reached)))
    if not reached.wait(120):
        raise SystemExit("the stream to cut never started")
    sh("ip", "-n", b.net.ns, "link", "set", b.net.ifname, "down")
    cut_at = time.monotonic()
    wait_until(lambda: lines[-1][1].get("done") or "error" in lines[-1][1], 300, "the cut stream ended")
    gap = next((t for t, _ in lines if t > cut_at), cut_at) - cut_at
    text = "".join(x.get("response", "") for _, x in lines)
    last = lines[-1][1]
    sh("ip", "-n", b.net.ns, "link", "set", b.net.ifname, "up")
    return gap, text == uncut and "error" not in last, last.get("error", "")


def raw_mlx_lm(model: Path, tokens: int) -> float:
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    m, tok = load(str(model))
    prompt = tok.apply_chat_template([{"role": "user", "content": STORY}], add_generation_prompt=True)
    last = None
    for last in stream_generate(m, tok, prompt, max_tokens=tokens, sampler=make_sampler(0.0)):
        pass
    return last.generation_tps


def row(name: str, value: str, note: str = "") -> None:
    print(f"{name:<62}{value:>14}   {note}", flush=True)


def main(args) -> None:
    from bench.models import smollm2_mlx_dir

    model = Path(args.model) if args.model else smollm2_mlx_dir()
    print(f"model {model.name}, {args.tokens} tokens, {args.rounds} rounds, {args.streams} streams, "
          f"history ~{args.history} tokens", flush=True)
    if not args.cut_only:
        raw = raw_mlx_lm(model, args.tokens)
        row("raw mlx_lm, 1 stream, decode tok/s", f"{raw:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="hippo-bench-pipeline-"))
    secret = os.urandom(16).hex()
    env = {"HIPPO_CLUSTER_SECRET": secret, "HIPPO_KEEP_ALIVE": "30m", "HIPPO_MEMORY_BUDGET": "4GB",
           "HIPPO_NUM_CTX": str(max(2048, args.history * 2)), "HIPPO_NUM_PARALLEL": str(args.streams),
           "HIPPO_SPARE_RUNNER": "1" if args.spare else "0"}
    with lan(2) as net:
        a, b = Node(net[0], tmp / "alpha", "alpha", env), Node(net[1], tmp / "beta", "beta", env)
        a.daemon.start()
        b.daemon.start()
        try:
            wait_until(lambda: trusted(a, b) and trusted(b, a), 30, "the daemons trust each other")
            status, body = a.call("POST", "/api/create", {"model": "m", "from": str(model), "stream": False})
            assert status == 200, body
            if not args.cut_only:
                one = decode_rate(a, args.tokens, args.rounds)
                row("one node, 1 stream, decode tok/s", f"{one:.2f}", f"{one / raw:.2f} of raw mlx_lm")
                one_n = aggregate(a, args.tokens, args.streams)
                row(f"one node, {args.streams} streams, aggregate tok/s", f"{one_n:.2f}")
                one_t1, one_t2, _ = chat_turns(a, args.history, 8)
                row("one node, chat: TTFT turn 1 / turn 2 (s)", f"{one_t1:.2f} / {one_t2:.2f}",
                    f"ratio {one_t2 / one_t1:.2f}")
            place(a, ["alpha", "beta"])
            if not args.cut_only:
                split = decode_rate(a, args.tokens, args.rounds)
                row("split, 1 stream, decode tok/s", f"{split:.2f}", f"split/one {split / one:.2f} (goal >= 0.95)")
                split_n = aggregate(a, args.tokens, args.streams)
                row(f"split, {args.streams} streams, aggregate tok/s", f"{split_n:.2f}",
                    f"split/one {split_n / one_n:.2f} (goal >= 0.9)")
                t1, t2, prompts = chat_turns(a, args.history, 8)
                row("split, chat: TTFT turn 1 / turn 2 (s)", f"{t1:.2f} / {t2:.2f}",
                    f"ratio {t2 / t1:.2f} (goal <= 0.3); prompt tokens {prompts}")
            gap, equal, error = peer_cut(a, b, args.cut_tokens)
            row("split, peer cut mid-stream: pause before the next token (s)", f"{gap:.2f}",
                f"greedy equal to uncut: {equal} (goal: within 5 s){' ' + error if error else ''}")
        finally:
            a.daemon.stop()
            b.daemon.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an MLX model directory (default: SmolLM2-135M from the test cache)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--cut-tokens", type=int, default=40, help="length of the stream that is cut after 6 lines")
    ap.add_argument("--cut-only", action="store_true", help="only the peer-cut row (setup, split, cut)")
    ap.add_argument("--spare", action="store_true",
                    help="keep a warm spare runner as hippod does by default (the cut's successor starts from it)")
    main(ap.parse_args())
