"""`hippoctl bench MODEL`: prompt and decode speed and time to first token through the daemon.

Each run sends fresh prompts (a unique opening, so no prompt cache helps) to /api/generate,
-c N of them at once. Speeds come from the daemon's own counters (prompt_eval_*, eval_*);
time to first token is measured here, from sending the request to the first streamed token.
The model is loaded before the first run, so no run pays for loading it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from typing import Any

from hippoctl.client import Client, HippoError
from hippoctl.tables import table

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather and what the message says.")

BENCH_ARGS = (
    (("model",), {}),
    (("-n", "--runs"), {"type": int, "default": 3, "help": "rounds to measure (default 3)"}),
    (("-c", "--concurrency"), {"type": int, "default": 1,
                               "help": "streams at once in each round (default 1)"}),
    (("--num-predict",), {"type": int, "default": 64, "help": "tokens per stream (default 64)"}),
    (("--prompt",), {"help": "the prompt (default: a short story request)"}),
    (("--json",), {"action": "store_true", "help": "print the results as JSON"}),
)


def one_stream(client: Client, body: dict) -> dict:
    started = time.perf_counter()
    ttft, final = None, {}
    for event in client.stream("/api/generate", body):
        if ttft is None and event.get("response"):
            ttft = time.perf_counter() - started
        if event.get("done"):
            final = event
    prompt_n, prompt_ns = final.get("prompt_eval_count") or 0, final.get("prompt_eval_duration") or 0
    eval_n, eval_ns = final.get("eval_count") or 0, final.get("eval_duration") or 0
    return {"ttft_s": ttft, "prompt_tokens": prompt_n, "tokens": eval_n,
            "prompt_tps": prompt_n / (prompt_ns / 1e9) if prompt_ns else None,
            "decode_tps": eval_n / (eval_ns / 1e9) if eval_ns else None,
            "seconds": time.perf_counter() - started}


def one_round(client: Client, args: argparse.Namespace, index: int) -> dict:
    results: list[dict | None] = [None] * args.concurrency
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        body = {"model": args.model, "stream": True,
                "prompt": f"[{uuid.uuid4().hex[:8]}] {args.prompt or PROMPT}",
                "options": {"num_predict": args.num_predict, "temperature": 0.7,
                            "seed": index * 1000 + slot}}
        try:
            results[slot] = one_stream(client, body)
        except BaseException as e:  # reported after the other streams finished
            errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - started
    streams = [r for r in results if r]
    return {"streams": streams, "wall_s": wall,
            "aggregate_tps": sum(r["tokens"] for r in streams) / wall if wall else None}


def summary(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(client: Client, args: argparse.Namespace) -> int | None:
    if args.runs < 1 or args.concurrency < 1 or args.num_predict < 1:
        raise HippoError("--runs, --concurrency and --num-predict must be at least 1")
    loaded = client.post("/api/generate", {"model": args.model, "prompt": ""})  # load it first
    rounds = []
    bar = _bar(args.runs * args.concurrency) if sys.stderr.isatty() else None
    try:
        for index in range(args.runs):
            rounds.append(one_round(client, args, index))
            if bar is not None:
                bar.update(args.concurrency)
    finally:
        if bar is not None:
            bar.close()
    streams = [s for r in rounds for s in r["streams"]]
    result: dict[str, Any] = {
        "model": (loaded or {}).get("model") or args.model, "runs": args.runs,
        "concurrency": args.concurrency, "num_predict": args.num_predict,
        "load_s": ((loaded or {}).get("load_duration") or 0) / 1e9,
        "prompt_tps": summary([s["prompt_tps"] for s in streams]),
        "decode_tps": summary([s["decode_tps"] for s in streams]),
        "ttft_s": summary([s["ttft_s"] for s in streams]),
        "tokens": summary([s["tokens"] for s in streams]),
    }
    if args.concurrency > 1:
        result["aggregate_tps"] = summary([r["aggregate_tps"] for r in rounds])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return None


def render(r: dict) -> str:
    def row(label: str, key: str, fmt) -> tuple | None:
        s = r.get(key)
        return None if not s else (label, fmt(s["median"]), fmt(s["min"]), fmt(s["max"]))

    tps = lambda v: f"{v:.1f} tok/s"  # noqa: E731
    ms = lambda v: f"{v * 1000:.0f} ms"  # noqa: E731
    rows = [row("prompt eval", "prompt_tps", tps), row("decode", "decode_tps", tps),
            row("time to first token", "ttft_s", ms), row("tokens per stream", "tokens", lambda v: f"{v:g}"),
            row(f"aggregate, {r['concurrency']} streams", "aggregate_tps", tps)]
    head = (f"{r['model']}: {r['runs']} run(s) x {r['concurrency']} stream(s), "
            f"{r['num_predict']} tokens each")
    return head + "\n\n" + table(("METRIC", "MEDIAN", "MIN", "MAX"), [x for x in rows if x])


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="benchmarking", unit="stream", file=sys.stderr, ncols=80)
