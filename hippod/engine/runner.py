"""Runner process: one loaded model, served to hippod over a Unix socket.

    python -m hippod.engine.runner --model DIR --socket PATH [--num-parallel N] [--context-length C]

The model lives in a generation thread (BatchLoop); the main thread runs an asyncio server that
turns socket lines into jobs. The runner exits when its stdin closes, so it never outlives the
daemon that started it, even after a kill -9 of the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

import psutil

from hippod.registry.modelinfo import config_context_length
from hippod.protocol import (
    DoneEvent,
    EmbedResult,
    ErrorEvent,
    InfoResult,
    ReadyEvent,
    SpareReadyEvent,
    SpareWarmEvent,
    decode_request,
    encode,
)

log = logging.getLogger("hippo.runner")
TERMINAL = (DoneEvent, ErrorEvent, EmbedResult, InfoResult)
FLUSH_SECONDS = 0.004
PAUSE_POLL_SECONDS = 0.05  # how often a paused warm-up looks again


def _deliver_all(batch: list) -> None:
    for events, event in batch:
        events.put_nowait(event)


def _model_context_length(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config_context_length(cfg) if isinstance(cfg, dict) else None


class Runner:
    def __init__(self, model_dir: Path, num_parallel: int, context_length: int, *,
                 draft: Path | None = None, self_draft_layers: int = 0, num_draft: int = 3,
                 draft_policy: str = "measured", prefill_batch: int = 0,
                 prompt_cache_bytes: int = 2 * 2**30, shard=None, remote_draft: str | None = None,
                 remote_draft_key_file: Path | None = None):
        self.model_dir = model_dir
        self.remote_draft = remote_draft  # HOST:PORT of a draft server on a peer
        self.remote_draft_key_file = remote_draft_key_file
        self.shard = shard  # pipeline split (issue 6): this runner is rank 0 of a split model
        self.draft = draft
        self.self_draft_layers = self_draft_layers
        self.num_draft = num_draft
        self.draft_policy = draft_policy
        self.prefill_batch = prefill_batch
        self.prompt_cache_bytes = prompt_cache_bytes
        self.num_parallel = num_parallel
        limit = _model_context_length(model_dir)
        self.context_length = min(context_length, limit) if limit else context_length
        self.loop_ready = threading.Event()
        self.load_error: BaseException | None = None
        self.batch = None
        self.load_seconds = 0.0
        self.outbox: list = []  # (queue, event) pairs not yet handed to the event loop
        self._flushed_at = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None

    def generation_thread(self) -> None:
        """Load and generate in one thread: MLX streams belong to the thread that made them."""
        if self.shard is not None:  # pipeline split (issue 6)
            return self._split_thread()
        try:
            import mlx.core as mx

            from hippod.engine.batch_loop import BatchLoop
            from hippod.engine.drafts import load_drafter

            t0 = time.perf_counter()
            from hippod.engine.dflash import is_dflash_dir

            if is_dflash_dir(self.model_dir):
                raise ValueError("this is a DFlash draft, which only drafts for its target "
                                 "(create TARGET --draft with it); it cannot run alone")
            model, tokenizer = load_model_and_tokenizer(self.model_dir)
            mx.eval(model.parameters())
            drafter = self._remote_drafter(model) or load_drafter(model, self.draft, self.self_draft_layers)
            self.load_seconds = time.perf_counter() - t0
            self.batch = BatchLoop(model, tokenizer, num_parallel=self.num_parallel,
                                   context_length=self.context_length, info=self.info,
                                   drafter=drafter, num_draft=self.num_draft, draft_policy=self.draft_policy,
                                   prompt_cache_bytes=self.prompt_cache_bytes, prefill_batch=self.prefill_batch)
        except BaseException as e:  # reported to the daemon, which shows it to the user
            self.load_error = e
            self.loop_ready.set()
            return
        self._serve("generation thread died", 70)

    def _remote_drafter(self, model):
        """The peer's draft server, when one was named; its key comes in the environment."""
        if not self.remote_draft:
            return None
        from hippod.engine.remote_draft import KEY_ENV, RemoteDrafter

        host, _, port = self.remote_draft.rpartition(":")
        key = os.environ.pop(KEY_ENV, "")
        if self.remote_draft_key_file is not None:  # from the daemon: read once, then gone
            key = self.remote_draft_key_file.read_text().strip()
            self.remote_draft_key_file.unlink(missing_ok=True)
        return RemoteDrafter(model, host.strip("[]"), int(port), bytes.fromhex(key))

    def _serve(self, why: str, code: int) -> None:
        """Run the loop; should it ever end, end the process. Without its generation thread a
        runner can only hang its requests, while a dead process is noticed by the daemon at
        once, which fails those requests and reloads on the next one."""
        self.loop_ready.set()
        try:
            self.batch.run_forever(after_step=self._flush)
        except BaseException:
            log.exception(why)
        sys.stderr.flush()
        os._exit(code)

    def _split_thread(self) -> None:
        """Rank 0 of a split model: joins the ring, loads its layers, batches its requests
        through the ring. A broken link ends the process, so the daemon notices at once."""
        try:
            from hippod.engine.pipeline import first_rank_loop

            t0 = time.perf_counter()
            self.batch = first_rank_loop(self.model_dir, self.shard, context_length=self.context_length,
                                         info=self.info, num_parallel=self.num_parallel,
                                         prompt_cache_bytes=self.prompt_cache_bytes,
                                         prefill_batch=self.prefill_batch)
            self.num_parallel = self.batch.num_parallel
            self.load_seconds = time.perf_counter() - t0
        except BaseException as e:
            self.load_error = e
            self.loop_ready.set()
            return
        self._serve("the split's pipeline broke", 3)

    def _flush(self) -> None:
        """Runs on the generation thread after each step. Waking the event loop costs the
        generation thread the GIL, so tokens go out at most every FLUSH_SECONDS (a few tokens
        at GPU speed, invisible to a reader); a finished job's events go out at once."""
        if not self.outbox:
            return
        now = time.perf_counter()
        if now - self._flushed_at < FLUSH_SECONDS and not isinstance(self.outbox[-1][1], TERMINAL):
            return
        batch, self.outbox = self.outbox, []
        self._flushed_at = now
        self.loop.call_soon_threadsafe(_deliver_all, batch)

    def info(self, active: int) -> InfoResult:
        import mlx.core as mx

        stats = getattr(self.batch, "stats", None)
        return InfoResult(os.getpid(), psutil.Process().memory_info().rss, mx.get_active_memory(),
                          mx.get_peak_memory(), self.context_length, self.num_parallel, active,
                          admission=stats.as_dict() if stats is not None else None)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from hippod.engine.batch_loop import Job

        events: asyncio.Queue = asyncio.Queue()
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                request = decode_request(line)
            except (ValueError, KeyError, TypeError) as e:
                writer.write(encode(ErrorEvent(f"bad runner request: {e}", status=400)))
                return
            job = Job(request, emit=lambda ev: self.outbox.append((events, ev)))
            self.batch.submit(job)
            eof = asyncio.ensure_future(reader.read())  # the daemon closing = cancel
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({getter, eof}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        job.cancelled.set()
                        return
                    batch = [getter.result()]
                    while not events.empty():  # send what piled up in one write
                        batch.append(events.get_nowait())
                    writer.write(b"".join(encode(ev) for ev in batch))
                    await writer.drain()
                    if any(isinstance(ev, TERMINAL) for ev in batch):
                        return
            except (ConnectionError, BrokenPipeError):
                job.cancelled.set()
            finally:
                eof.cancel()
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def serve(self, socket_path: Path) -> None:
        self.loop = asyncio.get_running_loop()
        server = await asyncio.start_unix_server(self.handle, path=str(socket_path), limit=64 * 2**20)
        import mlx.core as mx

        ready = ReadyEvent(os.getpid(), self.load_seconds, psutil.Process().memory_info().rss,
                           mx.get_active_memory(), self.context_length,
                           device=str(mx.default_device().type).rsplit(".", 1)[-1])
        sys.stdout.write(encode(ready).decode())
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.buffer.read)
        async with server:
            await stdin_closed  # the daemon went away (or closed our stdin to stop us)


def load_model_and_tokenizer(model_dir: Path):
    """mlx_lm.load, with the tokenizer read in a second thread while the weights load (the
    model stays in this thread: MLX streams belong to the thread that made them)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlx_lm.utils import load_config, load_model, load_tokenizer

    model_dir = Path(model_dir)
    eos = load_config(model_dir).get("eos_token_id")
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, model_dir, None, eos_token_ids=eos)
        model, _ = load_model(model_dir)
        return model, tokenizer.result()


def import_stack() -> None:
    """Import what a load needs and initialise the device with one tiny eval: after this the
    spare can take a model. (On CUDA the interpreter, the libraries and the device context are
    most of a new runner's start.)"""
    import mlx.core as mx
    from mlx_lm import load  # noqa: F401  (imports the tokenizer and model-loading stack)

    from hippod.engine.batch_loop import BatchLoop  # noqa: F401

    mx.eval(mx.ones((8,)) + 1)


def warm_steps():
    """The common kernels at small sizes, one small step each, so a waiting spare can stop
    between any two (on CUDA each new kernel compiles at first use, and all of them took more
    than two minutes on an H200: nothing may wait for the whole list)."""
    import mlx.core as mx
    import mlx.nn as nn

    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        x = mx.random.normal((8, 256)).astype(dtype)
        w = mx.random.normal((256, 256)).astype(dtype)

        def dense(x=x, w=w, dtype=dtype):
            h = mx.softmax(x @ w.T, axis=-1)
            mx.eval(nn.silu(mx.fast.rms_norm(h, mx.ones((256,), dtype=dtype), 1e-5)))

        def attention(x=x):
            q = x.reshape(1, 8, 4, 64).transpose(0, 2, 1, 3)
            q = mx.fast.rope(q, 64, traditional=False, base=10000.0, scale=1.0, offset=0)
            mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125, mask="causal"))

        yield dense
        yield attention
        if dtype != mx.float32:
            for bits in (4, 8):
                def quantized(x=x, w=w, bits=bits):
                    wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
                    mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                                group_size=64, bits=bits))

                yield quantized


def warm_up(stop=lambda: False, like: list[Path] = (), max_bytes: int = 0,
            paused: threading.Event | None = None) -> int:
    """Warm the kernels of the models `like` (a one-layer model of each, within `max_bytes`),
    or, when none of them could be warmed, the common ones, until `stop()` says a model is
    waiting; the number of steps run. While `paused` is set (the daemon's models are serving)
    no step starts: a warm-up shares the device with them and would slow their tokens."""
    from hippod.engine import warm

    done = _run_steps(warm.warm_steps(list(like), max_bytes), stop, paused)
    if done <= len(like):  # no hinted model was warmed (read at most); a stop ends it at once
        done += _run_steps(warm_steps(), stop, paused)
    return done


def _run_steps(steps, stop, paused: threading.Event | None = None) -> int:
    done = 0
    try:
        for step in steps:
            if paused is not None and paused.is_set() and not stop():
                log.info("spare warm-up held after %d steps: models are serving", done)
                while paused.is_set() and not stop():
                    time.sleep(PAUSE_POLL_SECONDS)
                log.info("spare warm-up goes on")
            if stop():
                break
            step()
            done += 1
    finally:
        steps.close()  # frees a warm model left half-used
    return done


def _spare_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hippod-runner --spare")
    ap.add_argument("--warm-like", nargs="*", type=Path, default=[],
                    help="model directories to warm kernels for (widths, dtype, quantization)")
    ap.add_argument("--warm-max-bytes", type=int, default=0,
                    help="the most memory the warm-up model may hold (0: no model warm-up)")
    return ap.parse_args(argv)


def spare_main(argv: list[str] = ()) -> int:
    """A runner started ahead of need: import and initialise the device in the generation
    thread (MLX streams belong to the thread that made them), say so, then warm kernels while
    waiting for the daemon to name the model; a named model stops the warming at once."""
    args = _spare_args(list(argv))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s runner[%(process)d] %(levelname)s %(message)s")
    handoff: queue.Queue = queue.Queue()
    imported = threading.Event()
    say = threading.Lock()  # stdout lines from two threads
    named = threading.Event()  # the daemon named the model: stdout is the load's from now on
    paused = threading.Event()  # the daemon's models are serving: no warm-up step starts
    t0 = time.perf_counter()

    def generation() -> None:
        try:
            import_stack()
        except Exception:  # the load will say what is wrong; the spare only loses its head start
            log.exception("spare runner could not import MLX")
        imported.set()
        steps, t1 = 0, time.perf_counter()
        try:
            steps = warm_up(stop=named.is_set, like=args.warm_like,
                            max_bytes=args.warm_max_bytes, paused=paused)
            log.info("spare warm-up: %d kernel steps in %.2fs", steps, time.perf_counter() - t1)
        except Exception:  # a failed warm-up only costs the load its speed-up
            log.exception("spare runner warm-up failed")
        with say:  # done either way: its warm-up model is gone
            if not named.is_set():
                sys.stdout.write(encode(SpareWarmEvent(steps, time.perf_counter() - t1)).decode())
                sys.stdout.flush()
        target = handoff.get()
        if target is not None:
            target()

    threading.Thread(target=generation, name="generate", daemon=True).start()
    imported.wait()
    ready = SpareReadyEvent(os.getpid(), psutil.Process().memory_info().rss, time.perf_counter() - t0)
    with say:
        sys.stdout.write(encode(ready).decode())
        sys.stdout.flush()
    while True:  # {"pause": bool} lines until the one that names the model
        line = sys.stdin.buffer.readline()  # the daemon closing our stdin: never needed, exit
        if not line:
            return 0
        message = json.loads(line)
        if "argv" in message:
            break
        (paused.set if message.get("pause") else paused.clear)()
    with say:
        named.set()
    return main(message["argv"], start=handoff.put)


def main(argv: list[str] | None = None, start=None) -> int:
    """`start` runs the generation thread's work: a new thread, or a spare's waiting thread."""
    if argv is None and sys.argv[1:2] == ["--spare"]:
        return spare_main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="hippod-runner")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--num-parallel", type=int, default=4)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--draft", type=Path, help="a small model of the same tokenizer to draft with")
    ap.add_argument("--self-draft-layers", type=int, default=0,
                    help="draft with the target's own first N layers (0: off)")
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--draft-policy", choices=("measured", "always"), default="measured",
                    help="measured: draft while it pays; always: every round drafts --num-draft")
    ap.add_argument("--prefill-batch", type=int, default=0,
                    help="prompts prefilled in one pass when several are admitted together (0: all)")
    ap.add_argument("--remote-draft", metavar="HOST:PORT",
                    help="draft on a peer's draft server (its key in HIPPO_DRAFT_KEY or the key file)")
    ap.add_argument("--remote-draft-key-file", type=Path, help="a file holding the session key (deleted once read)")
    ap.add_argument("--prompt-cache-bytes", type=int, default=2 * 2**30)
    # pipeline split (issue 6): the ring is described by MLX_HOSTFILE
    ap.add_argument("--layers", help="run only layers START:END of a model split across nodes")
    ap.add_argument("--rank", type=int, default=0, help="this runner's rank in the split")
    ap.add_argument("--world", type=int, default=1, help="runners in the split")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s runner[%(process)d] %(levelname)s %(message)s")
    shard = None
    if args.layers:  # pipeline split (issue 6): ranks after the first only pass hidden states on
        from hippod.engine.pipeline import Shard, serve_rank
        from hippod.protocol import LayerRange

        shard = Shard(LayerRange.parse(args.layers), args.rank, args.world)
        if shard.rank > 0:
            return serve_rank(args.model, shard, args.context_length)
    runner = Runner(args.model, args.num_parallel, args.context_length, draft=args.draft,
                    self_draft_layers=args.self_draft_layers, num_draft=args.num_draft,
                    draft_policy=args.draft_policy, prefill_batch=args.prefill_batch,
                    prompt_cache_bytes=args.prompt_cache_bytes, shard=shard, remote_draft=args.remote_draft,
                    remote_draft_key_file=args.remote_draft_key_file)
    start = start or (lambda work: threading.Thread(target=work, name="generate", daemon=True).start())
    start(runner.generation_thread)
    runner.loop_ready.wait()
    if runner.load_error is not None:
        msg = f"{type(runner.load_error).__name__}: {runner.load_error}"
        sys.stdout.write(encode(ErrorEvent(f"could not load model: {msg}", status=500)).decode())
        sys.stdout.flush()
        return 1
    try:
        args.socket.unlink(missing_ok=True)
        asyncio.run(runner.serve(args.socket))
    finally:
        args.socket.unlink(missing_ok=True)
    os._exit(0)  # do not wait for the generation thread


if __name__ == "__main__":
    sys.exit(main())
