"""Hot-swap A -> B + first token through hippod vs mlx_lm.load(B) + first token in-process, same run.

    python bench/hotswap.py                                         # CPU: a tiny llama and SmolLM2-135M
    python bench/hotswap.py --shape 1b-4bit --tokenizer DIR --rounds 3   # a GPU (random 1B, 4-bit)
    python bench/hotswap.py --model DIR --skip-cold                 # an MLX model directory

A and B are the same files under two names (each its own runner, its own load). A real hippod
gets HIPPO_MAX_LOADED_MODELS=1, so asking for B while A is loaded evicts A and loads B: with the
warm spare runner (each swap first waits until the spare says its warm-up is done, through
/api/hippo/status), and, unless --skip-cold, without it. Timed per swap:
  swap     a one-token request for B (raw prompt "hi"), from send to answer: eviction, load, first token
  runner   the runner's start as the loads table records it (spawn or handoff, imports, load)
  spare    whether B went into the spare's process (its pid)
and, in this process, after one untimed load and token of A (so, like a swap, the kernels of the
shape may already be compiled here): mlx_lm.load(B) + its first token; with --skip-cold left
out, also a fresh `python -c` process doing the same, what any cold process pays.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon  # noqa: E402

PROMPT = "hi"
ONE_TOKEN = {"prompt": PROMPT, "raw": True, "stream": False, "options": {"num_predict": 1}}


def wait_warm_spare(d: Daemon, timeout: float = 900) -> dict:
    """The spare's status once its warm-up is done; at once when there is none (no room for
    it, or a start that failed: a load starts one before it answers), else at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        _, st = d.request("GET", "/api/hippo/status")
        spare = st.get("spare") or {}
        if spare.get("state") in ("warm", "none", "off", None) or time.monotonic() > deadline:
            return spare
        time.sleep(0.2)


def through_hippod(model: Path, rounds: int, home: Path, spare: bool) -> list[dict]:
    env = {"HIPPO_MAX_LOADED_MODELS": "1", "HIPPO_SPARE_RUNNER": "1" if spare else "0",
           "HIPPO_NUM_PARALLEL": "4", "HIPPO_NUM_CTX": "2048"}
    swaps = []
    with Daemon(home, env=env) as d:
        for name in ("a", "b"):
            status, body = d.request("POST", "/api/create", {"model": name, "from": str(model),
                                                             "stream": False}, timeout=600)
            assert status == 200, body
        status, body = d.request("POST", "/api/generate", {"model": "a", **ONE_TOKEN}, timeout=900)
        assert status == 200, body
        target = "b"
        for _ in range(rounds):
            ready = wait_warm_spare(d) if spare else {}
            t0 = time.perf_counter()
            status, body = d.request("POST", "/api/generate", {"model": target, **ONE_TOKEN}, timeout=900)
            swap = time.perf_counter() - t0
            assert status == 200 and body.get("eval_count") == 1, body
            _, ps = d.request("GET", "/api/ps")
            pid = next(m["hippo"]["pid"] for m in ps["models"] if m["name"].startswith(target))
            _, rows = d.request("GET", "/api/hippo/loads?limit=2")
            new, old = rows["loads"][0], rows["loads"][1]
            assert new["model"].startswith(target) and old["end_reason"] == "evicted", rows
            swaps.append({"swap": swap, "runner": new["load_seconds"],
                          "spare": bool(ready.get("pid")) and pid == ready.get("pid"),
                          "spare_state": ready.get("state", "off"), "warm_s": ready.get("warm_seconds")})
            target = "a" if target == "b" else "b"
    return swaps


def in_process(model: Path, rounds: int) -> list[float]:
    """mlx_lm.load + the first token, after one untimed load + token (A's)."""
    import gc

    import mlx.core as mx
    from mlx_lm import generate, load

    times = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        m, tok = load(str(model))
        generate(m, tok, PROMPT, max_tokens=1)
        if i:
            times.append(time.perf_counter() - t0)
        del m, tok
        gc.collect()
        mx.clear_cache()
    return times


def cold_process(model: Path, rounds: int) -> list[float]:
    code = ("import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1]); "
            f"generate(m, t, {PROMPT!r}, max_tokens=1)")
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(model)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def models(args, tmp: Path) -> dict[str, Path]:
    if args.model:
        return {args.model.name: args.model}
    if args.shape:
        from bench.bench import make_model
        from bench.models import smollm2_mlx_dir

        tokenizer = args.tokenizer or smollm2_mlx_dir()
        return {s: make_model(s, args.work / s, tokenizer) for s in args.shape}
    from bench.models import make_tiny_llama, smollm2_mlx_dir

    return {"tiny (6 MB fp16)": make_tiny_llama(tmp / "tiny", seed=1),
            "SmolLM2-135M 4-bit (98 MB)": smollm2_mlx_dir()}


def main() -> int:
    from bench.bench import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="a random-weight llama of this shape (bench/bench.py's shapes)")
    ap.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json for --shape (default: SmolLM2's)")
    ap.add_argument("--model", type=Path, help="an MLX model directory to swap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true",
                    help="leave out the swaps without a spare and the fresh-process runs")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hippo-bench")
    args = ap.parse_args()
    med = statistics.median
    results = []
    with tempfile.TemporaryDirectory(prefix="hippo-hotswap-") as tmp:
        tmp = Path(tmp)
        for i, (label, model) in enumerate(models(args, tmp).items()):
            print(f"[{label}] hippod with the spare ...", flush=True)
            warm = through_hippod(model, args.rounds, tmp / f"home-{i}", spare=True)
            cold = [] if args.skip_cold else through_hippod(model, args.rounds, tmp / f"home-{i}-cold", spare=False)
            print(f"[{label}] in-process mlx_lm ...", flush=True)
            raw = in_process(model, args.rounds)
            fresh = [] if args.skip_cold else cold_process(model, args.rounds)
            results.append((label, warm, cold, raw, fresh))
    import mlx.core as mx

    print(f"\nhot swap A -> B + first token, {args.rounds} rounds, device {mx.default_device()} "
          f"(Python {sys.version.split()[0]}, {sys.platform}); target: swap <= 1.5x in-process\n")
    print("| model | round | swap, spare on | spare used | spare state before | runner start | "
          "in-process load + token | swap / in-process |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for label, warm, _, raw, _ in results:
        for r, (s, t) in enumerate(zip(warm, raw), 1):
            print(f"| {label} | {r} | {s['swap']:.2f} s | {'yes' if s['spare'] else 'no'} | "
                  f"{s['spare_state']} | {s['runner']:.2f} s | {t:.3f} s | {s['swap'] / t:.2f}x |")
    print("\n| model | swap, spare (median) | swap, no spare | in-process load + token | "
          "fresh python + load + token | spare swap / in-process | spare used |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, warm, cold, raw, fresh in results:
        fast = med(s["swap"] for s in warm)
        slow = f"{med(s['swap'] for s in cold):.2f} s" if cold else "-"
        fresh_s = f"{med(fresh):.2f} s" if fresh else "-"
        used = sum(s["spare"] for s in warm)
        print(f"| {label} | {fast:.2f} s | {slow} | {med(raw):.3f} s | {fresh_s} | "
              f"{fast / med(raw):.2f}x | {used}/{len(warm)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
