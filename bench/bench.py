"""hippod vs raw mlx_lm vs mlx_lm.server, same model, same run; one table of ratios at the end.

    python bench/bench.py --quick                      # CPU: tiny model, short streams, 512-token prompt
    python bench/bench.py --shape 1b-4bit --tokens 256 # a GPU (about 4-6 min on an H200)
    python bench/bench.py --smollm2 --tokens 16 --bursts-only --skip-server --skip-peer  # admission, CPU

Each shape is a random-weight Llama with the real SmolLM2 tokenizer (weights do not change
speed). Rows, each measured for raw mlx_lm (in this process) | mlx_lm.server | hippod:
  1 stream            decode tok/s and time to first token (raw: stream_generate)
  8 together          aggregate tok/s, mean and p99 time to first token (raw: BatchGenerator)
  8, 100 ms apart     the same with arrivals spread out (raw: inserted at those times)
  32 together         the same at 32 streams
  3,000-token prompt  time to first token
  swap A->B + 1 token hippod's hot swap (warm spare runner) against mlx_lm.load(B) + one token
                      in-process; hippod's first load (no spare yet) beside it
  peer copy           hippod pulling the model from a peer against raw TCP on the same veth,
                      dropped and written to the same tmpfs as the receiving home
                      (two network namespaces; needs root and iproute2, else the row is empty)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon, free_port  # noqa: E402
from bench.hotswap import wait_warm_spare  # noqa: E402

SHAPES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, quantize bits or None)
    "tiny": (4, 256, 512, 8, 4, None),
    "1b-4bit": (16, 2048, 8192, 32, 8, 4),
    "8b-bf16": (32, 4096, 14336, 32, 8, None),
}
BURSTS = [("8 together", 8, 0.0), ("8, 100 ms apart", 8, 0.1), ("32 together", 32, 0.0)]
BURSTS_ONLY = False  # --bursts-only: the burst rows alone (admission work on a slow CPU)
LONG_PROMPT_TOKENS = 3000
_counter = iter(range(10**9))

# A story opening: a real model continues it (an instruction given raw may end at once).
PROMPT = ("Once upon a time, in a small village by the sea, there lived an old lighthouse "
          "keeper who every night climbed the tower and")


def fresh_prompt() -> str:
    """A prompt no earlier request shared, so hippod's prompt cache gives it no head start."""
    return f"Story {next(_counter)}. " + PROMPT


def long_prompt(tok) -> str:
    """A fresh prompt of LONG_PROMPT_TOKENS tokens (in `tok`, the model's tokenizer)."""
    text = fresh_prompt()
    while len(tok.encode(text)) < LONG_PROMPT_TOKENS:
        text += " " + PROMPT
    ids = tok.encode(text)[:LONG_PROMPT_TOKENS]
    return tok.decode(ids)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def summary(ttfts: list[float], tokens: int, seconds: float) -> dict:
    return {"agg_tps": tokens / seconds, "ttft_s": statistics.mean(ttfts), "ttft_p99_s": p99(ttfts)}


def make_model(shape: str, dst: Path, tokenizer_dir: Path) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    if (dst / "config.json").exists():
        return dst
    layers, hidden, inter, heads, kv, bits = SHAPES[shape]
    vocab = 49152
    cfg = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
           "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
           "rms_norm_eps": 1e-5, "vocab_size": vocab, "max_position_embeddings": 8192,
           "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        cfg["quantization"] = {"group_size": 64, "bits": bits}
    dst.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, dst / f)
    del model, weights
    gc.collect()
    return dst


# -- raw mlx_lm ---------------------------------------------------------------------------


def raw_burst(model, tok, n: int, gap: float, tokens: int) -> dict:
    """n streams into one BatchGenerator, stream i inserted at i*gap seconds, as raw mlx_lm
    would serve them: aggregate tok/s and each stream's time to first token from its arrival."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=max(n, 1),
                         prefill_batch_size=min(n, 8))
    prompts = [tok.encode(fresh_prompt()) for _ in range(n)]
    t0 = time.perf_counter()
    arrive = [t0 + i * gap for i in range(n)]
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    produced = finished = nxt = 0
    while finished < n:
        now = time.perf_counter()
        due = [p for i, p in enumerate(prompts[nxt:], nxt) if arrive[i] <= now]
        if due:
            for uid, i in zip(gen.insert(due, max_tokens=[tokens] * len(due)), range(nxt, nxt + len(due))):
                sent[uid] = arrive[i]
            nxt += len(due)
        if nxt == finished:  # nothing running: wait for the next arrival
            time.sleep(max(0.0, arrive[nxt] - time.perf_counter()))
            continue
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            first.setdefault(r.uid, now)
            produced += 1
            finished += r.finish_reason is not None
    seconds = time.perf_counter() - t0
    gen.close()
    del gen
    mx.clear_cache()
    return summary([first[u] - sent[u] for u in sent], produced, seconds)


def best_raw_burst(model, tok, n: int, gap: float, tokens: int) -> dict:
    """Raw's better of two runs (by aggregate): on CUDA a raw 8-burst right after its warm-up
    has come 8-9 s late in some runs, which would flatter hippod's ratios."""
    runs = [raw_burst(model, tok, n, gap, tokens) for _ in range(2)]
    best = max(runs, key=lambda r: r["agg_tps"])
    return {**best, "runs_agg_tps": [round(r["agg_tps"], 1) for r in runs]}


def bench_raw(model_dir: Path, tokens: int, spec_layers: int = 0) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    t0 = time.perf_counter()
    model, tok = load(str(model_dir))
    mx.eval(model.parameters())
    out = {"load_s": time.perf_counter() - t0}
    if BURSTS_ONLY:
        # one stream first, as the full run does: the first burst of a fresh process ran ~9 s late on CUDA
        for _ in stream_generate(model, tok, tok.encode(fresh_prompt()), max_tokens=tokens):
            pass
        for label, n, gap in BURSTS:
            raw_burst(model, tok, n, 0.0, tokens)  # warm-up as long as the run: CUDA compiles per cache size
            out[label] = best_raw_burst(model, tok, n, gap, tokens)
        return out
    # Warm-ups run as long as the measurement: on CUDA every new cache size compiles kernels.
    for _ in stream_generate(model, tok, tok.encode(fresh_prompt()), max_tokens=tokens):
        pass
    t0 = time.perf_counter()
    ttft = last = None
    for r in stream_generate(model, tok, tok.encode(fresh_prompt()), max_tokens=tokens):
        ttft = ttft or time.perf_counter() - t0
        last = r
    out.update(ttft_s=ttft, decode_tps=last.generation_tps)
    for _ in range(2):  # the first pass warms up
        ids = tok.encode(long_prompt(tok))
        t0 = time.perf_counter()
        next(iter(stream_generate(model, tok, ids, max_tokens=1)))
        out["long_ttft_s"] = time.perf_counter() - t0
    for label, n, gap in BURSTS:
        raw_burst(model, tok, n, 0.0, 16)  # warm-up: compiles this batch size's kernels
        out[label] = best_raw_burst(model, tok, n, gap, tokens)
    if spec_layers:  # speculative decoding with the target's own first layers as the draft
        from hippod.engine.drafts import self_draft

        draft = self_draft(model, spec_layers)
        for p in (fresh_prompt(), fresh_prompt()):  # the first pass warms up
            accepted = 0
            for r in stream_generate(model, tok, tok.encode(p), max_tokens=tokens,
                                     draft_model=draft, num_draft_tokens=3):
                accepted += bool(r.from_draft)
                last = r
        out["spec_decode_tps"] = last.generation_tps
        out["spec_acceptance"] = accepted / max(last.generation_tokens, 1)
    out["long_prompt"] = long_prompt(tok)  # for the servers
    del model
    gc.collect()
    mx.clear_cache()
    # What a hot swap is held against: loading B in a warm process, then its first token.
    swaps = []
    for _ in range(2):
        t0 = time.perf_counter()
        model, tok = load(str(model_dir))
        mx.eval(model.parameters())
        next(iter(stream_generate(model, tok, tok.encode("hi"), max_tokens=1)))
        swaps.append(time.perf_counter() - t0)
        del model, tok
        gc.collect()
        mx.clear_cache()
    out["swap_s"] = statistics.mean(swaps)
    return out


# -- HTTP clients ---------------------------------------------------------------------------


async def _stream_hippod(session, url, model, tokens, prompt=None) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt or fresh_prompt(), "raw": True, "stream": True,
            "options": {"temperature": 0, "num_predict": tokens}}
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async with session.post(url + "/api/generate", json=body) as r:
        async for line in r.content:
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(msg["error"])
            now = time.perf_counter()
            if msg.get("done"):
                count = msg["eval_count"]
                # admission to first token inside the runner: the rest of TTFT is the way there
                ENGINE_TTFT.append(msg.get("prompt_eval_duration", 0) / 1e9)
                break
            first = first or now
            last = now
    if first is None:  # the model ended at once (a real model may answer EOS)
        return time.perf_counter() - t0, 0.0, count
    return first - t0, last - first, count


async def _stream_mlx_server(session, url, model, tokens, prompt=None) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt or fresh_prompt(), "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async with session.post(url + "/v1/completions", json=body) as r:
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            now = time.perf_counter()
            if msg.get("usage"):
                count = msg["usage"]["completion_tokens"]
            if msg.get("choices") and msg["choices"][0].get("text"):
                first = first or now
                last = now
    if first is None:  # the model ended at once (a real model may answer EOS)
        return time.perf_counter() - t0, 0.0, count
    return first - t0, last - first, count


ENGINE_TTFT: list[float] = []  # hippod's own prompt_eval_duration of each answer, seconds


async def http_burst(session, stream, url: str, model: str, n: int, gap: float, tokens: int) -> dict:
    t0 = time.perf_counter()
    ENGINE_TTFT.clear()

    async def one(i: int) -> tuple[float, int]:
        await asyncio.sleep(i * gap)
        ttft, _, count = await stream(session, url, model, tokens)
        return ttft, count

    results = await asyncio.gather(*(one(i) for i in range(n)))
    out = summary([t for t, _ in results], sum(c for _, c in results), time.perf_counter() - t0)
    if ENGINE_TTFT:
        out["engine_ttft_s"] = statistics.mean(ENGINE_TTFT)
    return out


async def bench_http(url: str, model: str, tokens: int, kind: str, prompt_3k: str) -> dict:
    stream = _stream_hippod if kind == "hippod" else _stream_mlx_server
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
        await stream(s, url, model, tokens)  # warm-up (and load), as long as the measurement
        out = {}
        if not BURSTS_ONLY:
            ttft, span, count = await stream(s, url, model, tokens)
            out.update(ttft_s=ttft, decode_tps=(count - 1) / span if span > 0 else 0.0)
            for p in (prompt_3k.replace("Story", "Tale", 1), prompt_3k):  # the first warms up
                out["long_ttft_s"] = (await stream(s, url, model, 1, p))[0]
        for label, n, gap in BURSTS:
            await http_burst(s, stream, url, model, n, 0.0, tokens)  # warm-up, as long as the run
            out[label] = await http_burst(s, stream, url, model, n, gap, tokens)
    return out


def bench_mlx_server(model_dir: Path, tokens: int, prompt_3k: str, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    most = max(n for _, n, _ in BURSTS)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir),
                             "--port", str(port), "--decode-concurrency", str(most),
                             "--prompt-concurrency", "8", "--max-tokens", str(tokens)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_http(url, "/v1/models", proc)
        return asyncio.run(bench_http(url, str(model_dir), tokens, "mlx_server", prompt_3k))
    finally:
        proc.terminate()
        proc.wait(30)


def bench_hippod(model_dir: Path, tokens: int, prompt_3k: str, home: Path,
                 prefill_batch: int | None = None) -> dict:
    most = max(n for _, n, _ in BURSTS)
    env = {"HIPPO_NUM_PARALLEL": str(most), "HIPPO_MAX_LOADED_MODELS": "1",
           "HIPPO_MEMORY_BUDGET": os.environ.get("HIPPO_MEMORY_BUDGET", "60GB"),
           "HIPPO_SPARE_RUNNER": "1"}
    if prefill_batch:
        env["HIPPO_PREFILL_BATCH"] = str(prefill_batch)
    with Daemon(home, env=env) as d:
        out = {"daemon_start_s": d.ready_seconds}

        def one_token(model: str) -> float:
            t0 = time.perf_counter()
            status, body = d.request("POST", "/api/generate", {
                "model": model, "prompt": "hi", "raw": True, "stream": False,
                "options": {"num_predict": 1}}, timeout=600)
            if status != 200:
                raise RuntimeError(f"hippod answered {status}: {body}")
            return time.perf_counter() - t0

        for name in ("bench-a", "bench-b"):  # the same blobs, each its own runner
            status, body = d.request("POST", "/api/create", {"model": name, "from": str(model_dir),
                                                             "stream": False}, timeout=600)
            if status != 200:
                raise RuntimeError(f"create failed: {body}")
        out["first_load_s"] = one_token("bench-a")  # no spare exists before the first load
        out.update(asyncio.run(bench_http(d.url, "bench-a", tokens, "hippod", prompt_3k)))
        out["admission"] = d.admission()
        if BURSTS_ONLY:
            return out
        swaps, used = [], []
        for target in ("bench-b", "bench-a"):  # A is loaded; B evicts it, and back
            spare = wait_warm_spare(d)  # a swap is timed into a spare whose warm-up is done
            swaps.append(one_token(target))
            _, ps = d.request("GET", "/api/ps")
            used.append(bool(spare.get("pid")) and [m["hippo"]["pid"] for m in ps["models"]] == [spare["pid"]])
        out["swap_s"] = statistics.mean(swaps)
        out["swap_used_spare"] = all(used)
    return out


def bench_peer_copy(model_dir: Path, work: Path) -> dict:
    """Two hippods in two network namespaces joined by a veth; the second pulls the model from
    the first, its home on a tmpfs. Against: one TCP connection sending the largest blob over the
    same veth, dropped and written to the same tmpfs (bench/peer_copy.py has the whole table)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {}
    from bench.peer_copy import TMPFS, one_fs

    mb = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) >> 20
    r = one_fs("tmpfs", TMPFS, model_dir, work, 1, None, 2 * mb + 256)
    return {"peer_MBps": r["pull"][0], "raw_MBps": r["raw_null"][0], "raw_file_MBps": r["raw_file"][0],
            "cpu_s_per_GB": {k: v[0] for k, v in r["cpu"].items()},
            "peer_bytes": r["bytes"], "sha256_MBps": r["sha256"], "copy_MBps": (r["copy"] or [None])[0]}


def wait_http(url: str, path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + path, timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def bench_hippod_spec(model_dir: Path, tokens: int, home: Path, layers: int) -> dict:
    """Single-stream decode with HIPPO_SELF_DRAFT_LAYERS, and the acceptance hippod reports."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HIPPO_HOME": str(home), "HIPPO_SELF_DRAFT_LAYERS": str(layers),
           "HIPPO_MEMORY_BUDGET": os.environ.get("HIPPO_MEMORY_BUDGET", "60GB"),
           "HIPPO_DISCOVERY": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "hippod.daemon", "--port", str(port)], env=env,
                            stdout=open(home / "bench-spec.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_http(url, "/api/version", proc)

        async def run() -> dict:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
                await s.post(url + "/api/create", json={"model": "spec", "from": str(model_dir),
                                                        "stream": False})
                await _stream_hippod(s, url, "spec", tokens)  # warm-up
                _, span, count = await _stream_hippod(s, url, "spec", tokens)
                body = {"model": "spec", "prompt": fresh_prompt(), "raw": True, "stream": False,
                        "options": {"temperature": 0, "num_predict": tokens}}
                async with s.post(url + "/api/generate", json=body) as r:
                    final = await r.json()
                return {"spec_decode_tps": (count - 1) / span if span > 0 else 0.0,
                        "spec_acceptance": final.get("draft_accepted_count", 0) / max(final["eval_count"], 1)}

        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(60)


def fresh_process_first_token(model_dir: Path) -> float:
    """What a cold start costs raw mlx_lm: a new process loads the model and makes one token.
    (A hippod hot-swap starts a new runner process too; on CUDA its kernels are compiled anew.)"""
    code = ("import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1]); "
            "generate(m, t, 'hi', max_tokens=1)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def rows_for(r: dict) -> list[tuple[str, str, object, object, object, str]]:
    """(row, metric, raw, server, hippod, how hippod compares) for one shape's results."""
    raw, srv, hip = r["raw"], r["server"], r["hippod"]
    ms = lambda d, k: None if d.get(k) is None else d[k] * 1000  # noqa: E731
    rows = [("1 stream", "decode tok/s", raw.get("decode_tps"), srv.get("decode_tps"),
             hip.get("decode_tps"), "ratio"),
            ("1 stream", "TTFT ms", ms(raw, "ttft_s"), ms(srv, "ttft_s"), ms(hip, "ttft_s"), "delta")]
    for label, _, _ in BURSTS:
        a, b, c = raw.get(label, {}), srv.get(label, {}), hip.get(label, {})
        rows += [(label, "aggregate tok/s", a.get("agg_tps"), b.get("agg_tps"), c.get("agg_tps"), "ratio"),
                 (label, "TTFT mean ms", ms(a, "ttft_s"), ms(b, "ttft_s"), ms(c, "ttft_s"), "times"),
                 (label, "TTFT p99 ms", ms(a, "ttft_p99_s"), ms(b, "ttft_p99_s"), ms(c, "ttft_p99_s"), "times")]
    rows += [(f"{LONG_PROMPT_TOKENS:,}-token prompt", "TTFT ms", ms(raw, "long_ttft_s"),
              ms(srv, "long_ttft_s"), ms(hip, "long_ttft_s"), "times"),
             ("swap A->B + 1 token", "s (raw: load in-process)", raw.get("swap_s"), None,
              hip.get("swap_s"), "times"),
             ("first load + 1 token", "s (hippod: no spare yet)", raw.get("swap_s"), None,
              hip.get("first_load_s"), "times"),
             ("new process + 1 token", "s (raw: python -c)", raw.get("cold_first_token_s"), None,
              hip.get("swap_s"), "times")]
    if r.get("peer"):
        peer = r["peer"]
        rows += [("peer copy", "MB/s (raw: one TCP stream)", peer["raw_MBps"], None,
                  peer["peer_MBps"], "ratio"),
                 ("peer copy, copy alone", "MB/s (daemon's log)", peer["raw_MBps"], None,
                  peer.get("copy_MBps"), "ratio"),
                 ("sha256, one core", "MB/s (verify ceiling)", peer["raw_MBps"], None,
                  peer.get("sha256_MBps"), "ratio"),
                 ("peer copy vs raw -> fs", "MB/s (raw: TCP written to the tmpfs)", peer.get("raw_file_MBps"),
                  None, peer["peer_MBps"], "ratio")]
    if raw.get("spec_decode_tps"):
        rows.append(("speculative", "decode tok/s", raw["spec_decode_tps"], None,
                     hip.get("spec_decode_tps"), "ratio"))
    return rows


def compare(how: str, raw, hip) -> str:
    if not raw or not hip:
        return "-"
    if how == "delta":
        return f"{hip - raw:+.1f} ms"
    return f"{hip / raw:.2f}" + ("x" if how == "times" else "")


def print_table(results: dict, device: str, tokens: int) -> None:
    print(f"\nhippo benchmark — device {device}, {tokens} tokens per stream, "
          f"{time.strftime('%Y-%m-%d')} (ratio: higher is better; x: lower is better)")
    cols = ("shape", "row", "metric", "raw mlx_lm", "mlx_lm.server", "hippod", "hippod vs raw",
            "hippod vs server")
    lines = []
    for shape, r in results.items():
        for row, metric, a, b, c, how in rows_for(r):
            digits = 2 if "s (" in metric else 1
            lines.append((shape, row, metric, fmt(a, digits), fmt(b, digits), fmt(c, digits),
                          compare(how, a, c), compare(how, b, c) if how != "delta" or b else "-"))
    widths = [max(len(x) for x in col) for col in zip(cols, *lines)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(v.ljust(w) if i < 3 else v.rjust(w)
                                for i, (v, w) in enumerate(zip(line, widths))) + " |")


def main() -> int:
    global LONG_PROMPT_TOKENS, BURSTS_ONLY
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: the tiny shape, 32 tokens per stream (unless given)")
    ap.add_argument("--model-dir", type=Path, help="benchmark this MLX model directory instead")
    ap.add_argument("--smollm2", action="store_true", help="benchmark the real SmolLM2-135M (CPU-sized)")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--long-prompt", type=int, help=f"tokens of the long prompt (default "
                    f"{LONG_PROMPT_TOKENS}, 512 with --quick)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hippo-bench")
    ap.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (default: converted SmolLM2)")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-peer", action="store_true", help="leave out the peer-copy row")
    ap.add_argument("--bursts-only", action="store_true", help="only the burst rows (8, 8 spread, 32)")
    ap.add_argument("--prefill-batch", default="",
                    help="hippod's prefill_batch, or several (8,32): a hippod run for each, "
                         "beside the same raw and server rows")
    ap.add_argument("--spec-layers", type=int, default=0,
                    help="also measure speculative decoding drafted by the first N layers")
    args = ap.parse_args()
    BURSTS_ONLY = args.bursts_only
    tokens = args.tokens or (32 if args.quick else 128)
    LONG_PROMPT_TOKENS = args.long_prompt or (512 if args.quick else LONG_PROMPT_TOKENS)
    shapes = args.shape or ([] if args.model_dir or args.smollm2 else ["tiny"])
    if args.smollm2:
        from bench.models import smollm2_mlx_dir
        args.model_dir = smollm2_mlx_dir()
    if args.model_dir:
        shapes.append(str(args.model_dir))
    if args.tokenizer is None and any(s in SHAPES for s in shapes):
        from bench.models import smollm2_mlx_dir
        args.tokenizer = smollm2_mlx_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    import mlx.core as mx

    device = str(mx.default_device())
    results = {}
    started = time.perf_counter()
    for shape in shapes:
        model_dir = Path(shape) if shape not in SHAPES else make_model(shape, args.work / shape, args.tokenizer)
        shape = model_dir.name[:8] if shape not in SHAPES else shape
        step = lambda what: print(f"[{shape} {time.perf_counter() - started:6.1f}s] {what}", flush=True)  # noqa: E731
        step("raw mlx_lm ...")
        raw = bench_raw(model_dir, tokens, args.spec_layers)
        prompt_3k = raw.pop("long_prompt", "")
        if not BURSTS_ONLY:
            raw["cold_first_token_s"] = fresh_process_first_token(model_dir)
        step(f"raw: {json.dumps(raw)}")
        server = {}
        if not args.skip_server:
            step("mlx_lm.server ...")
            server = bench_mlx_server(model_dir, tokens, prompt_3k, args.work / f"{shape}-server.log")
            step(f"server: {json.dumps(server)}")
        home = Path(tempfile.mkdtemp(prefix="hippo-bench-home-"))
        batches = [int(v) for v in args.prefill_batch.split(",") if v.strip()] or [None]
        for extra in batches[1:]:  # the first value's run is the shape's own row set, below
            step(f"hippod, prefill_batch {extra} ...")
            other = Path(tempfile.mkdtemp(prefix="hippo-bench-home-"))
            hip = bench_hippod(model_dir, tokens, prompt_3k, other, extra)
            step(f"hippod, prefill_batch {extra}: {json.dumps(hip)}")
            shutil.rmtree(other, ignore_errors=True)
            results[f"{shape}, prefill_batch {extra}"] = {"raw": raw, "server": server, "hippod": hip}
        step("hippod ..." if batches[0] is None else f"hippod, prefill_batch {batches[0]} ...")
        hip = bench_hippod(model_dir, tokens, prompt_3k, home, batches[0])
        if args.spec_layers:
            spec_home = Path(tempfile.mkdtemp(prefix="hippo-bench-spec-"))
            hip.update(bench_hippod_spec(model_dir, tokens, spec_home, args.spec_layers))
            shutil.rmtree(spec_home, ignore_errors=True)
        step(f"hippod: {json.dumps(hip)}")
        shutil.rmtree(home, ignore_errors=True)
        peer = {}
        if not args.skip_peer:
            step("peer copy ...")
            peer_work = Path(tempfile.mkdtemp(prefix="hippo-bench-peer-"))
            try:
                peer = bench_peer_copy(model_dir, peer_work)
            except Exception as e:  # the other rows stand without it
                step(f"peer copy failed: {e}")
            shutil.rmtree(peer_work, ignore_errors=True)
            step(f"peer: {json.dumps(peer)}")
        results[shape] = {"raw": raw, "server": server, "hippod": hip, "peer": peer}
    if args.json:
        args.json.write_text(json.dumps({"device": device, "tokens": tokens, "results": results}, indent=1))
    print_table(results, device, tokens)
    print(f"\n(whole run: {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
