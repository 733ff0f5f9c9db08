"""Pipeline split vs one runner: decode tok/s of the same model, same run; prints the ratio.

    python bench/pipeline.py                          # SmolLM2-135M (4-bit), split 15/15, CPU
    python bench/pipeline.py --model DIR --tokens 64 --rounds 5 --split 15

The split is two runner processes joined by MLX's ring backend over loopback TCP, exactly as
hippod starts them (rank 0 samples, rank 1 runs the other layers and the head); the baseline is
one runner with the whole model. Both serve the same greedy request through the runner socket,
alternating round by round so background load hits both alike; decode tok/s is completion
tokens / eval seconds from the runner's own done event (prefill excluded). On a CPU-only box
each rank computes while the other waits, so the ideal ratio is just under 1.0; the goal is
>= 0.85.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hippod.protocol import DoneEvent, GenerateRequest  # noqa: E402
from hippod.runner_process import RunnerProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def decode_rate(runner: RunnerProcess, tokens: int, round_: int) -> float:
    request = GenerateRequest(messages=[{"role": "user", "content": f"{round_}. {PROMPT}"}],
                              options={"temperature": 0, "num_predict": tokens})
    done = None
    async for ev in runner.generate(request):
        if isinstance(ev, DoneEvent):
            done = ev
    if done.completion_tokens < 2 or done.eval_seconds <= 0:
        raise RuntimeError(f"the model stopped after {done.completion_tokens} token(s): {done}")
    return (done.completion_tokens - 1) / done.eval_seconds


async def main(args) -> None:
    from bench.models import smollm2_mlx_dir

    model = Path(args.model) if args.model else smollm2_mlx_dir()
    layers = json.loads((model / "config.json").read_text()).get("num_hidden_layers")
    split = args.split or layers // 2
    tmp = Path(tempfile.mkdtemp(prefix="hippo-bench-pipeline-"))
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    log = tmp / "runners.log"
    one = RunnerProcess(model, tmp, log, num_parallel=1, context_length=2048)
    ranks = [RunnerProcess(model, tmp, log, num_parallel=1, context_length=2048,
                           extra_env={"MLX_HOSTFILE": str(hostfile)},
                           extra_args=["--layers", f"{a}:{b}", "--rank", str(r), "--world", "2"])
             for r, (a, b) in enumerate(((0, split), (split, layers)))]
    try:
        await asyncio.gather(one.start(300), *(r.start(300) for r in ranks))
        await decode_rate(one, 8, -1)  # warm-up: first-call compilation and page faults
        await decode_rate(ranks[0], 8, -1)
        singles, splits = [], []
        for i in range(args.rounds):
            singles.append(await decode_rate(one, args.tokens, i))
            splits.append(await decode_rate(ranks[0], args.tokens, i))
            print(f"round {i + 1}: one runner {singles[-1]:.2f} tok/s, split {splits[-1]:.2f} tok/s", flush=True)
    finally:
        for r in (one, *ranks):
            await r.kill()
    s, p = statistics.median(singles), statistics.median(splits)
    print(f"\nmodel {model.name}, {layers} layers, split {split}/{layers - split}, {args.tokens} tokens, "
          f"{args.rounds} rounds (medians)")
    print(f"{'one runner':<24}{s:8.2f} tok/s")
    print(f"{'two-rank split':<24}{p:8.2f} tok/s")
    print(f"{'ratio split/one':<24}{p / s:8.2f}   (goal >= 0.85)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an MLX model directory (default: SmolLM2-135M from the test cache)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--split", type=int, help="first layer of rank 1 (default: half)")
    asyncio.run(main(ap.parse_args()))
