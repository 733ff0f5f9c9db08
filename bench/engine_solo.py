"""One stream's decode speed in one process: raw mlx_lm stream_generate against hippod's own
generation loop (BatchLoop, no daemon, no HTTP), alternating, on the same model.

    python bench/engine_solo.py --shape 1b-4bit --tokenizer .gpu/tok

Across processes a GPU's single-stream rate can differ by a third; side by side in one process
it tells whether a gap measured through hippod is the engine's or the way there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import SHAPES, fresh_prompt, make_model  # noqa: E402


def raw_tps(model, tok, tokens: int) -> float:
    from mlx_lm import stream_generate

    for r in stream_generate(model, tok, tok.encode(fresh_prompt()), max_tokens=tokens):
        pass
    return r.generation_tps


def loop_tps(loop, tokens: int) -> float:
    """Tokens per second after the first, as the generation thread hands them out."""
    from hippod.engine.batch_loop import Job
    from hippod.protocol import DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

    times: list[float] = []
    done = threading.Event()

    def emit(ev) -> None:
        if isinstance(ev, TokenEvent):
            times.append(time.perf_counter())
        if isinstance(ev, (DoneEvent, ErrorEvent)):
            done.set()

    loop.submit(Job(GenerateRequest(prompt=fresh_prompt(), raw=True,
                                    options={"temperature": 0, "num_predict": tokens}), emit))
    if not done.wait(600) or len(times) < 2:
        raise RuntimeError("the generation loop did not finish the stream")
    return (len(times) - 1) / (times[-1] - times[0])


def running_loop(shape: str, tokenizer: Path | None):
    """A random-weight model of `shape`, and hippod's generation loop running on it."""
    if tokenizer is None:
        from bench.models import smollm2_mlx_dir
        tokenizer = smollm2_mlx_dir()
    from mlx_lm import load

    from hippod.engine.batch_loop import BatchLoop

    model_dir = make_model(shape, Path(tempfile.mkdtemp()) / shape, tokenizer)
    model, tok = load(str(model_dir))
    loop = BatchLoop(model, tok, num_parallel=32, context_length=4096, info=lambda n: None)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return model, tok, loop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (default: converted SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model, tok, loop = running_loop(args.shape, args.tokenizer)
    raw_tps(model, tok, args.tokens), loop_tps(loop, args.tokens)  # warm-ups
    raw, hip = [], []
    for _ in range(args.rounds):
        raw.append(raw_tps(model, tok, args.tokens))
        hip.append(loop_tps(loop, args.tokens))
    print(f"| shape | raw stream_generate tok/s | hippod BatchLoop tok/s | ratio |\n|---|---:|---:|---:|\n"
          f"| {args.shape} | {statistics.median(raw):.1f} ({min(raw):.0f}-{max(raw):.0f}) | "
          f"{statistics.median(hip):.1f} ({min(hip):.0f}-{max(hip):.0f}) | "
          f"{statistics.median(hip) / statistics.median(raw):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
