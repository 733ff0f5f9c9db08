"""A burst's time to first token in one process: raw mlx_lm BatchGenerator against hippod's own
generation loop (BatchLoop, no daemon, no HTTP), alternating, on the same model, with where the
loop's time went.

    python bench/engine_burst.py --shape 1b-4bit --tokenizer .gpu/tok

The loop's jobs are numbered as the daemon numbers them: job i is sent saying i jobs were
numbered, `--spacing` seconds after the one before (the daemon's own pace between sends), so
the first of a burst finds the runner idle and nothing said to be behind it. Through the daemon
the client's TTFT adds HTTP and the socket on top; this tells which part of a gap is the loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import SHAPES, best_raw_burst, fresh_prompt  # noqa: E402
from bench.engine_solo import running_loop  # noqa: E402


class Phases:
    """Wall seconds in each named loop method, from a burst's first send until every stream
    of it has its first token (`active`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False

    def wrap(self, obj, name: str, label: str | None = None) -> None:
        inner = getattr(obj, name)
        label = label or name

        def timed(*args, **kwargs):
            counted, t0 = self.active, time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if counted:
                    self.seconds[label] += time.perf_counter() - t0
                    self.calls[label] += 1

        setattr(obj, name, timed)

    def take(self) -> dict:
        out = {k: (round(v * 1000, 1), self.calls[k]) for k, v in sorted(self.seconds.items())}
        self.seconds.clear()
        self.calls.clear()
        return out


def loop_burst(loop, n: int, tokens: int, spacing: float, phases: Phases) -> dict:
    """n jobs sent `spacing` apart, numbered as the daemon numbers them: each stream's TTFT
    from its send, and the aggregate rate."""
    from hippod.engine.batch_loop import Job
    from hippod.protocol import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    counts: dict[int, int] = defaultdict(int)
    done = threading.Semaphore(0)

    def emitter(i: int):
        def emit(ev) -> None:
            if isinstance(ev, TokenEvent):
                first.setdefault(i, time.perf_counter())
                counts[i] += 1
                if len(first) == n:
                    phases.active = False
            if isinstance(ev, (DoneEvent, ErrorEvent)):
                done.release()
        return emit

    base = loop.stats.arrivals.told
    phases.active = True
    t0 = time.perf_counter()
    for i in range(n):
        req = GenerateRequest(prompt=fresh_prompt(), raw=True,
                              options={"temperature": 0, "num_predict": tokens})
        req.arrival, req.arrived = base + i + 1, base + i + 1
        sent[i] = time.perf_counter()
        loop.submit(Job(req, emitter(i)))
        if spacing:
            time.sleep(spacing)
    for _ in range(n):
        if not done.acquire(timeout=600):
            raise RuntimeError("the generation loop did not finish the burst")
    seconds = time.perf_counter() - t0
    ttfts = [first[i] - sent[i] for i in range(n)]
    return {"ttft_ms": statistics.mean(ttfts) * 1000, "ttft_max_ms": max(ttfts) * 1000,
            "agg_tps": sum(counts.values()) / seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (default: converted SmolLM2)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="8,32")
    ap.add_argument("--spacing", default="0,0.001", help="seconds between the loop's sends, comma list")
    args = ap.parse_args()
    model, tok, loop = running_loop(args.shape, args.tokenizer)
    phases = Phases()
    for name in ("_prepare", "_start_solo", "_step_solo", "_move_solo_to_batch", "_insert_batch"):
        phases.wrap(loop, name)
    phases.wrap(loop.generator, "next", "generator.next")
    sizes = [int(s) for s in args.sizes.split(",")]
    spacings = [float(s) for s in args.spacing.split(",")]
    for n in sizes:  # warm-ups: every shape each row meets, both ways
        best_raw_burst(model, tok, n, 0.0, args.tokens)
        for s in spacings:
            loop_burst(loop, n, args.tokens, s, phases)
    phases.take()
    print("| burst | raw TTFT ms | loop TTFT ms (max) | TTFT ratio | raw agg | loop agg | agg ratio | "
          "loop inserts | loop ms until every first token (calls) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for n in sizes:
        for s in spacings:
            for _ in range(args.rounds):
                raw = best_raw_burst(model, tok, n, 0.0, args.tokens)
                marks = len(loop.stats.batch_inserts), loop.stats.solo_starts
                hip = loop_burst(loop, n, args.tokens, s, phases)
                inserts = loop.stats.batch_inserts[marks[0]:]
                solo = loop.stats.solo_starts - marks[1]
                spent = phases.take()
                print(f"| {n}, sent {s * 1000:g} ms apart | {raw['ttft_s'] * 1000:.1f} | "
                      f"{hip['ttft_ms']:.1f} ({hip['ttft_max_ms']:.0f}) | {hip['ttft_ms'] / (raw['ttft_s'] * 1000):.2f} | "
                      f"{raw['agg_tps']:.0f} | {hip['agg_tps']:.0f} | {hip['agg_tps'] / raw['agg_tps']:.2f} | "
                      f"{'solo 1 + ' if solo else ''}{inserts} | "
                      + ", ".join(f"{k} {ms} ({c})" for k, (ms, c) in spent.items()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
