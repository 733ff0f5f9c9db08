"""Hot-swap A -> B through hippod vs mlx_lm.load(B) in-process, measured in the same run.

    python bench/hotswap.py                 # tiny random llamas and SmolLM2-135M (4-bit)
    python bench/hotswap.py --rounds 5

For each pair a real hippod gets a memory budget that holds one of the two models, so asking for
B while A is loaded makes the scheduler evict A and start a runner for B: once with the warm
spare runner (B goes into a process started ahead, MLX imported), once without. Timed per swap:
  swap     the load-only request for B (empty prompt), from send to answer
  runner   the runner's start as the loads table records it (spawn, imports, mlx_lm.load, ready)
  evict    the rest: stopping A's runner, bookkeeping, HTTP
and, in this process (mlx and mlx_lm already imported): mlx_lm.load(B) + evaluating its
weights, what the runner does once it has started; and a fresh `python -c "mlx_lm.load(B)"`
process, what any cold process pays (interpreter, imports, load).
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

from hippod.registry.modelinfo import inspect_model_dir  # noqa: E402
from hippod.scheduler import RUNNER_OVERHEAD, kv_cache_bytes  # noqa: E402
from bench.daemon import Daemon  # noqa: E402
from bench.models import make_tiny_llama, smollm2_mlx_dir  # noqa: E402

NUM_CTX, NUM_PARALLEL = 2048, 4


def estimate(model_dir: Path) -> int:
    info = inspect_model_dir(model_dir)
    ctx = min(NUM_CTX, info.context_length or NUM_CTX)
    return info.weights_bytes + kv_cache_bytes(info.as_details(), ctx, NUM_PARALLEL) + RUNNER_OVERHEAD


def through_hippod(a: Path, b: Path, rounds: int, home: Path, spare: bool) -> list[dict]:
    """Swaps with the warm spare runner on (each swap waits until the spare is ready) or off."""
    budget = int(max(estimate(a), estimate(b)) * 1.5)
    env = {"HIPPO_MEMORY_BUDGET": str(budget), "HIPPO_NUM_CTX": str(NUM_CTX),
           "HIPPO_NUM_PARALLEL": str(NUM_PARALLEL), "HIPPO_SPARE_RUNNER": "1" if spare else "0"}
    swaps = []
    with Daemon(home, env=env) as d:
        for name, path in (("a", a), ("b", b)):
            status, body = d.request("POST", "/api/create", {"model": name, "from": str(path),
                                                             "stream": False}, timeout=600)
            assert status == 200, body
        status, body = d.request("POST", "/api/generate", {"model": "a", "prompt": ""})
        assert status == 200, body
        target = "b"
        for i in range(rounds):
            deadline = time.monotonic() + 120
            while spare and d.log().count("spare runner ready") <= i and time.monotonic() < deadline:
                time.sleep(0.1)
            t0 = time.perf_counter()
            status, body = d.request("POST", "/api/generate", {"model": target, "prompt": ""},
                                     timeout=600)
            swap = time.perf_counter() - t0
            assert status == 200 and body["done_reason"] == "load", body
            _, rows = d.request("GET", "/api/hippo/loads?limit=2")
            new, old = rows["loads"][0], rows["loads"][1]
            assert new["model"].startswith(target) and old["end_reason"] == "evicted", rows
            swaps.append({"swap": swap, "runner": new["load_seconds"],
                          "evict": swap - new["load_seconds"]})
            target = "a" if target == "b" else "b"
    return swaps


def in_process(b: Path, rounds: int) -> list[float]:
    import gc

    import mlx.core as mx
    from mlx_lm import load

    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model, _tok = load(str(b))
        mx.eval(model.parameters())
        times.append(time.perf_counter() - t0)
        del model, _tok
        gc.collect()
        mx.clear_cache()
    return times


def cold_process(b: Path, rounds: int) -> list[float]:
    code = ("import mlx.core as mx; from mlx_lm import load; "
            f"m, t = load({str(b)!r}); mx.eval(m.parameters())")
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="hippo-hotswap-") as tmp:
        tmp = Path(tmp)
        smol = smollm2_mlx_dir()
        pairs = {
            "tiny (6 MB fp16)": (make_tiny_llama(tmp / "tiny-a", seed=1),
                                 make_tiny_llama(tmp / "tiny-b", seed=2)),
            # B is the same SmolLM2 files under another name: its own runner, its own load.
            "SmolLM2-135M 4-bit (98 MB)": (smol, smol),
        }
        rows = []
        for label, (a, b) in pairs.items():
            warm_swaps = through_hippod(a, b, args.rounds, tmp / f"home-{len(rows)}", spare=True)
            swaps = through_hippod(a, b, args.rounds, tmp / f"home-{len(rows)}-cold", spare=False)
            rows.append((label, warm_swaps, swaps, in_process(b, args.rounds),
                         cold_process(b, args.rounds)))
    print(f"\nhot-swap A -> B, median of {args.rounds} (Python {sys.version.split()[0]}, "
          f"{sys.platform})\n")
    print("| model | swap, warm spare | swap, no spare | runner start (no spare) | evict + rest "
          "| mlx_lm.load(B) in-process | fresh python + mlx_lm.load(B) | spare swap / in-process |")
    print("|---|---|---|---|---|---|---|---|")
    for label, warm_swaps, swaps, warm, cold in rows:
        fast, swap = med(s["swap"] for s in warm_swaps), med(s["swap"] for s in swaps)
        print(f"| {label} | {fast:.2f} s | {swap:.2f} s | {med(s['runner'] for s in swaps):.2f} s | "
              f"{med(s['evict'] for s in swaps):.2f} s | {med(warm):.3f} s | {med(cold):.2f} s | "
              f"{fast / med(warm):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
