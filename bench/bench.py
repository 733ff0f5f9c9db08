"""hippod vs raw mlx_lm vs mlx_lm.server, same model, same run; prints a table of ratios last.

    python bench/bench.py --shape tiny                 # CPU smoke run (ratios only)
    python bench/bench.py --shape 1b-4bit --shape 8b-bf16 --tokens 256   # on a GPU

Each shape is a random-weight Llama with the real SmolLM2 tokenizer (weights do not change
speed). Measured per shape:
  decode tok/s, single stream: raw stream_generate | mlx_lm.server | hippod /api/generate
  time to first token: same three
  aggregate tok/s at N concurrent streams: raw BatchGenerator | mlx_lm.server | hippod
  hot-swap A->B through hippod vs mlx_lm.load(B) in-process
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, quantize bits or None)
    "tiny": (4, 256, 512, 8, 4, None),
    "1b-4bit": (16, 2048, 8192, 32, 8, 4),
    "8b-bf16": (32, 4096, 14336, 32, 8, None),
}
_counter = iter(range(10**9))


def fresh_prompt() -> str:
    """A prompt no earlier request shared, so hippod's prompt cache gives it no head start."""
    return f"Story {next(_counter)}. " + PROMPT


# A story opening: a real model continues it (an instruction given raw may end at once).
PROMPT = ("Once upon a time, in a small village by the sea, there lived an old lighthouse "
          "keeper who every night climbed the tower and")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# -- raw mlx_lm -----------------------------------------------------------------------------


def bench_raw(model_dir: Path, tokens: int, concurrency: list[int], spec_layers: int = 0) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    t0 = time.perf_counter()
    model, tok = load(str(model_dir))
    load_s = time.perf_counter() - t0
    # Warm-ups run as long as the measurement: on CUDA every new cache size compiles kernels.
    for _ in stream_generate(model, tok, tok.encode(fresh_prompt()), max_tokens=tokens):
        pass
    prompt = tok.encode(fresh_prompt())
    t0 = time.perf_counter()
    ttft = None
    last = None
    for r in stream_generate(model, tok, prompt, max_tokens=tokens):
        if ttft is None:
            ttft = time.perf_counter() - t0
        last = r
    out = {"load_s": load_s, "ttft_s": ttft, "decode_tps": last.generation_tps,
           "prompt_tokens": len(prompt)}
    repeat = tok.encode(fresh_prompt() * 8)
    for _ in range(2):  # raw mlx_lm keeps no prompt cache between calls: the same work twice
        t0 = time.perf_counter()
        next(iter(stream_generate(model, tok, repeat, max_tokens=1)))
        out["ttft_repeat_s"] = time.perf_counter() - t0
    for n in concurrency:
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=max(n, 1),
                             prefill_batch_size=min(n, 8))
        for count in (16, tokens):  # the first pass warms up (compiles) this batch shape
            t0 = time.perf_counter()
            gen.insert([tok.encode(fresh_prompt()) for _ in range(n)], max_tokens=[count] * n)
            produced = 0
            while produced < n * count:
                _, responses = gen.next()
                produced += len(responses)
        out[f"agg_tps_{n}"] = produced / (time.perf_counter() - t0)
        gen.close()
        del gen
    if spec_layers:  # speculative decoding with the target's own first layers as the draft
        from hippod.engine.drafts import self_draft

        draft = self_draft(model, spec_layers)
        for p in (fresh_prompt(), fresh_prompt()):  # the first pass warms up
            drafted = accepted = 0
            for r in stream_generate(model, tok, tok.encode(p), max_tokens=tokens,
                                     draft_model=draft, num_draft_tokens=3):
                accepted += bool(r.from_draft)
                last = r
        out["spec_decode_tps"] = last.generation_tps
        out["spec_acceptance"] = accepted / max(last.generation_tokens, 1)
    del model
    gc.collect()
    mx.clear_cache()
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


async def bench_http(url: str, model: str, tokens: int, concurrency: list[int], kind: str) -> dict:
    stream = _stream_hippod if kind == "hippod" else _stream_mlx_server
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await stream(s, url, model, tokens)  # warm-up (and load), as long as the measurement
        ttft, span, count = await stream(s, url, model, tokens)
        out = {"ttft_s": ttft, "decode_tps": (count - 1) / span if span > 0 else 0.0}
        # A repeated prompt (a chat's next turn re-sends the history): prompt caching shows here.
        repeat = fresh_prompt() * 8
        await stream(s, url, model, 1, repeat)
        out["ttft_repeat_s"] = (await stream(s, url, model, 1, repeat))[0]
        for n in concurrency:
            await asyncio.gather(*(stream(s, url, model, 16) for _ in range(n)))  # warm-up
            t0 = time.perf_counter()
            results = await asyncio.gather(*(stream(s, url, model, tokens) for _ in range(n)))
            out[f"agg_tps_{n}"] = sum(c for _, _, c in results) / (time.perf_counter() - t0)
    return out


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


def bench_mlx_server(model_dir: Path, tokens: int, concurrency: list[int], log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir),
                             "--port", str(port), "--decode-concurrency", str(max(concurrency)),
                             "--max-tokens", str(tokens)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_http(url, "/v1/models", proc)
        return asyncio.run(bench_http(url, str(model_dir), tokens, concurrency, "mlx_server"))
    finally:
        proc.terminate()
        proc.wait(30)


def bench_hippod(model_dir: Path, tokens: int, concurrency: list[int], home: Path) -> dict:
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HIPPO_HOME": str(home), "HIPPO_NUM_PARALLEL": str(max(concurrency)),
           "HIPPO_MEMORY_BUDGET": os.environ.get("HIPPO_MEMORY_BUDGET", "60GB"),
           "HIPPO_MAX_LOADED_MODELS": "1", "HIPPO_DISCOVERY": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hippod.daemon", "--port", str(port)], env=env,
                            stdout=open(home / "bench-hippod.log", "w"), stderr=subprocess.STDOUT)
    try:
        try:
            wait_http(url, "/api/version", proc)
        except RuntimeError:
            print((home / "bench-hippod.log").read_text()[-3000:], file=sys.stderr)
            raise
        start_s = time.perf_counter() - t0

        def post(path, body):
            req = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=1800) as r:
                return json.loads(r.read() or b"{}")

        post("/api/create", {"model": "bench-a", "from": str(model_dir), "stream": False})
        post("/api/copy", {"source": "bench-a", "destination": "bench-b"})  # same blobs, own runner
        out = asyncio.run(bench_http(url, "bench-a", tokens, concurrency, "hippod"))
        out["daemon_start_s"] = start_s
        # Hot-swap: A is loaded; ask for B (max one loaded model) and time the load it needs.
        t0 = time.perf_counter()
        r = post("/api/generate", {"model": "bench-b", "prompt": "hi", "raw": True,
                                   "options": {"num_predict": 1}, "stream": False})
        out["swap_s"] = time.perf_counter() - t0
        out["swap_load_s"] = r["load_duration"] / 1e9
        return out
    finally:
        proc.terminate()
        proc.wait(60)


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--model-dir", type=Path, help="benchmark this MLX model directory instead "
                    "(e.g. bench.models.smollm2_mlx_dir())")
    ap.add_argument("--smollm2", action="store_true", help="benchmark the real SmolLM2-135M (CPU-sized)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hippo-bench")
    ap.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (default: converted SmolLM2)")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--spec-layers", type=int, default=0,
                    help="also measure speculative decoding drafted by the first N layers")
    args = ap.parse_args()
    shapes = args.shape or ([] if args.model_dir or args.smollm2 else ["tiny"])
    if args.smollm2:
        from bench.models import smollm2_mlx_dir
        args.model_dir = smollm2_mlx_dir()
    if args.model_dir:
        shapes.append(str(args.model_dir))
    conc = [1] + [int(c) for c in args.concurrency.split(",") if c]
    if args.tokenizer is None and any(s in SHAPES for s in shapes):
        from bench.models import smollm2_mlx_dir
        args.tokenizer = smollm2_mlx_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    import mlx.core as mx

    device = str(mx.default_device())
    results = {}
    for shape in shapes:
        model_dir = Path(shape) if shape not in SHAPES else make_model(shape, args.work / shape, args.tokenizer)
        shape = model_dir.name[:8] if shape not in SHAPES else shape
        print(f"[{shape}] raw mlx_lm ...", flush=True)
        raw = bench_raw(model_dir, args.tokens, conc, args.spec_layers)
        t0 = time.perf_counter()
        import mlx_lm

        m, _ = mlx_lm.load(str(model_dir))
        mx.eval(m.parameters())
        raw["load_again_s"] = time.perf_counter() - t0
        raw["cold_first_token_s"] = fresh_process_first_token(model_dir)
        del m
        gc.collect()
        mx.clear_cache()
        print(f"[{shape}] raw: {json.dumps(raw)}", flush=True)
        server = {}
        if not args.skip_server:
            print(f"[{shape}] mlx_lm.server ...", flush=True)
            server = bench_mlx_server(model_dir, args.tokens, conc, args.work / f"{shape}-server.log")
            print(f"[{shape}] server: {json.dumps(server)}", flush=True)
        home = Path(tempfile.mkdtemp(prefix="hippo-bench-home-"))
        print(f"[{shape}] hippod ...", flush=True)
        hip = bench_hippod(model_dir, args.tokens, conc, home)
        if args.spec_layers:
            spec_home = Path(tempfile.mkdtemp(prefix="hippo-bench-spec-"))
            hip.update(bench_hippod_spec(model_dir, args.tokens, spec_home, args.spec_layers))
            shutil.rmtree(spec_home, ignore_errors=True)
        print(f"[{shape}] hippod: {json.dumps(hip)}", flush=True)
        shutil.rmtree(home, ignore_errors=True)
        results[shape] = {"raw": raw, "server": server, "hippod": hip}
    if args.json:
        args.json.write_text(json.dumps({"device": device, "tokens": args.tokens, "results": results}, indent=1))

    print(f"\nhippo benchmark — device {device}, {args.tokens} tokens per stream, "
          f"{time.strftime('%Y-%m-%d')}")
    head = f"| {'shape':8} | {'metric':24} | {'raw mlx_lm':>10} | {'mlx_lm.server':>13} | {'hippod':>8} | {'hippod/raw':>10} | {'hippod/server':>13} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for shape, r in results.items():
        raw, srv, hip = r["raw"], r["server"], r["hippod"]
        rows = [("decode tok/s (1 stream)", "decode_tps", True), ("TTFT ms", "ttft_s", False),
                ("TTFT ms, repeated prompt", "ttft_repeat_s", False)]
        rows += [(f"aggregate tok/s @{n}", f"agg_tps_{n}", True) for n in conc]
        for label, key, higher in rows:
            a, b, c = raw.get(key), srv.get(key), hip.get(key)
            if key.startswith("ttft"):
                a, b, c = [None if v is None else v * 1000 for v in (a, b, c)]
                print(f"| {shape:8} | {label:24} | {fmt(a):>10} | {fmt(b):>13} | {fmt(c):>8} | "
                      f"{f'{c - a:+.1f} ms' if a and c else '-':>10} | {ratio(b, c) if b else '-':>13} |")
            else:
                print(f"| {shape:8} | {label:24} | {fmt(a):>10} | {fmt(b):>13} | {fmt(c):>8} | "
                      f"{ratio(c, a):>10} | {ratio(c, b):>13} |")
        if raw.get("spec_decode_tps"):
            print(f"| {shape:8} | {'speculative tok/s':24} | {fmt(raw['spec_decode_tps']):>10} | {'-':>13} | "
                  f"{fmt(hip.get('spec_decode_tps')):>8} | {ratio(hip.get('spec_decode_tps'), raw['spec_decode_tps']):>10} | {'-':>13} |")
            print(f"| {shape:8} | {'speculative speedup':24} | {ratio(raw['spec_decode_tps'], raw['decode_tps']):>10} | {'-':>13} | "
                  f"{ratio(hip.get('spec_decode_tps'), hip.get('decode_tps')):>8} | {'-':>10} | {'-':>13} |")
            print(f"| {shape:8} | {'draft acceptance':24} | {raw['spec_acceptance']:>10.2f} | {'-':>13} | "
                  f"{hip.get('spec_acceptance', 0):>8.2f} | {'-':>10} | {'-':>13} |")
        print(f"| {shape:8} | {'hot-swap s (load B)':24} | {fmt(raw.get('load_again_s'), 2):>10} | {'-':>13} | "
              f"{fmt(hip.get('swap_s'), 2):>8} | {ratio(hip.get('swap_s'), raw.get('load_again_s')):>10} | {'-':>13} |")
        print(f"| {shape:8} | {'new process: load+1 tok s':24} | {fmt(raw.get('cold_first_token_s'), 2):>10} | {'-':>13} | "
              f"{fmt(hip.get('swap_s'), 2):>8} | {ratio(hip.get('swap_s'), raw.get('cold_first_token_s')):>10} | {'-':>13} |")
        print(f"| {shape:8} | {'daemon start ms':24} | {'-':>10} | {'-':>13} | "
              f"{fmt(hip.get('daemon_start_s', 0) * 1000, 0):>8} | {'-':>10} | {'-':>13} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
