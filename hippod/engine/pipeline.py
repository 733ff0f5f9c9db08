"""Pipeline parallelism: one model's layers split over runner processes joined by mx.distributed.

Each rank holds a contiguous range of decoder layers. Rank 0 also holds the embeddings and
samples; the last rank holds the final norm and the LM head (and the embeddings too when they
are tied to the head). For every forward pass rank 0 embeds and runs its layers, then sends a
small header and the hidden state to rank 1; each rank runs its layers and passes the result
on; the last rank sends the logits of the last position back to rank 0 (its ring neighbour).
Rank 0 batches with mlx_lm's BatchGenerator; each forward names the sequence of every row, and
each rank keeps its own layers' KV per sequence (split_caches.py).

The wrapper is generic, like exo's: it finds the decoder's `layers` list and works through each
family's own forward code instead of re-implementing it. Unlike exo it keeps the layer list at
full length and puts a pass-through stand-in where another rank's layer was, so a family that
picks masks or layer kinds by index (llama's sliding layers, gemma3's `i % pattern`) needs no
patching. A stand-in advances its cache with zero-width keys, so every mask the family builds
from any layer's cache sees the same offsets as on one machine.

Loading is lazy (mx.load maps the safetensors files); a rank drops the modules it does not run
before evaluating the parameters, so it reads only its own tensors from disk.
"""

from __future__ import annotations

import copy
import logging
import os
import selectors
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_lm.models.cache import BatchKVCache

from hippod.engine.batch_loop import BatchLoop
from hippod.engine.split_caches import RankCaches, SequenceTags, batchable, live_tags, new_tag
from hippod.protocol import ErrorEvent, LayerRange

log = logging.getLogger("hippo.pipeline")

FORWARD, DROP, STOP, FORK = 1, 2, 3, 4
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
HEADER = 6  # int32: command, then FORWARD: batch, length, width, dtype index, alone; DROP: count;
# FORK: source tag, new tag. A FORWARD from rank 0 is followed by its rows (tag, length, valid).


@dataclass(frozen=True)
class Shard:
    layers: LayerRange  # the decoder layers this rank runs
    rank: int
    world: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1


# -- finding the decoder ------------------------------------------------------------------------


def decoder_parts(model) -> tuple[nn.Module, nn.Module]:
    """(owner, decoder): the decoder has the `layers` list; its owner applies the LM head."""
    for path in (("model",), ("language_model", "model")):
        owner, obj = None, model
        for name in path:
            owner, obj = obj, getattr(obj, name, None)
        if obj is not None and isinstance(getattr(obj, "layers", None), list):
            return owner, obj
    raise ValueError("this model family has no decoder layer list to split")


class _Slot:
    """Holds the hidden state received for the next forward (not an mx parameter)."""

    value = None


class _StandIn(nn.Module):
    """A layer another rank runs: passes the hidden state through (or, right before this rank's
    first layer, swaps in the one received), and advances its cache by the same number of
    tokens with zero-width keys, which costs no memory."""

    def __init__(self, layer: nn.Module, slot: _Slot | None = None):
        super().__init__()
        for key, value in vars(layer).items():  # flags families read in their loop (use_sliding)
            if isinstance(value, (bool, int, float, str)) and not key.startswith("_"):
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_slot", slot)

    def __call__(self, x, *args, **kwargs):
        cache = kwargs.get("cache")
        if cache is None:
            cache = next((a for a in args if hasattr(a, "update_and_fetch")), None)
        if cache is not None:
            empty = mx.zeros((x.shape[0], 1, x.shape[1], 0), mx.float16)
            cache.update_and_fetch(empty, empty)
        if self._slot is not None and self._slot.value is not None:
            x, self._slot.value = self._slot.value, None
        return x


class _NoEmbedding(nn.Module):
    """Ranks after the first never look tokens up: their hidden state arrives over the wire."""

    def __call__(self, inputs):
        return mx.zeros((*inputs.shape, 1), mx.float16)


class _LastPosition(nn.Module):
    """Wraps the decoder so the owner's head runs on the last position only: a prefill chunk
    then costs one row of the LM head instead of one per token."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)[:, -1:, :]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


# -- loading one rank's part --------------------------------------------------------------------


def load_shard(model_dir: Path, shard: Shard):
    """The model with only this rank's parts evaluated, and its fresh-cache templates.

    Files the rank does not need may be missing from `model_dir` (a peer copies only the
    safetensors files holding its tensors); every parameter the rank keeps must be present.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model_dir = Path(model_dir)
    model, _config = load_model(model_dir, lazy=True, strict=False)
    owner, decoder = decoder_parts(model)
    total = len(decoder.layers)
    if not 0 <= shard.layers.start < shard.layers.end <= total:
        raise ValueError(f"layers {shard.layers.arg()} are outside the model's {total} layers")
    if shard.first and shard.layers.start != 0 or shard.last and shard.layers.end != total:
        raise ValueError(f"rank {shard.rank} of {shard.world} cannot hold layers {shard.layers.arg()}")
    templates = model.make_cache() if hasattr(model, "make_cache") else None
    slot = _Slot()
    layers = list(decoder.layers)
    for i, layer in enumerate(layers):
        if i not in shard.layers:
            inject = not shard.first and i == shard.layers.start - 1
            layers[i] = _StandIn(layer, slot if inject else None)
    decoder.layers = layers
    tied = "lm_head" not in owner
    if not shard.first and not (shard.last and tied):
        decoder.embed_tokens = _NoEmbedding()
    if not shard.last:
        decoder.norm = nn.Identity()
        if "lm_head" in owner:
            owner.pop("lm_head")
    kept = [name for name, _ in tree_flatten(model.parameters())]
    _check_present(model_dir, kept)
    mx.eval(model.parameters())
    model.eval()
    return model, owner, decoder, slot, templates


def _check_present(model_dir: Path, names: list[str]) -> None:
    """With strict=False a missing tensor would silently stay random: refuse instead."""
    from hippod.registry.modelinfo import read_safetensors_header

    have: set[str] = set()
    for f in model_dir.glob("*.safetensors"):
        have.update(k for k in read_safetensors_header(f) if k != "__metadata__")
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"{len(missing)} tensors of this shard are not in {model_dir} "
                         f"(first: {missing[0]})")


# -- the wire -----------------------------------------------------------------------------------


class Wire:
    """send/recv over the group, waiting for data without spinning.

    The ring backend's socket thread busy-polls while a recv is posted: a rank waiting for its
    neighbour (or a loaded, idle split waiting for the next request) would burn a core. So a
    message's first recv is posted only once one of the ring's sockets is readable; the data
    then sits in the kernel buffer and the recv completes at once.
    """

    def __init__(self, group, hostfile: str | None = None):
        self.group = group
        self.fds = _ring_socket_fds(group, hostfile or os.environ.get("MLX_HOSTFILE"))
        self.selector = selectors.DefaultSelector()
        for fd in self.fds:
            self.selector.register(fd, selectors.EVENT_READ)
        if not self.fds:
            log.warning("could not find the ring's sockets: waiting for peers will spin a core")

    def send(self, x: mx.array, dst: int) -> None:
        mx.eval(mx.distributed.send(x, dst, group=self.group))

    def recv(self, shape, dtype, src: int, wait: bool = False) -> mx.array:
        if wait and self.fds:
            while not self.selector.select():
                pass
        x = mx.distributed.recv(shape, dtype, src, group=self.group)
        mx.eval(x)
        return x

    def send_message(self, header: mx.array, x: mx.array | None, dst: int) -> None:
        if x is not None:
            mx.eval(x)  # compute first: the neighbour wakes when the header arrives
        self.send(header, dst)
        if x is not None:
            self.send(x, dst)

    def recv_header(self, src: int) -> list[int]:
        return self.recv((HEADER,), mx.int32, src, wait=True).tolist()


def _ring_socket_fds(group, hostfile: str | None) -> list[int]:
    """File descriptors of this rank's ring connections, found by their addresses."""
    if not hostfile:
        return []
    import json

    import psutil

    try:
        hosts = [[str(a) for a in entry] for entry in json.loads(Path(hostfile).read_text())]
    except (OSError, ValueError):
        return []
    rank, size = group.rank(), group.size()
    mine = {int(a.rsplit(":", 1)[1]) for a in hosts[rank]}
    theirs = {a for r in ((rank + 1) % size, (rank - 1) % size) for a in hosts[r]}
    fds = []
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.fd is None or c.fd < 0 or c.status != psutil.CONN_ESTABLISHED or not c.raddr:
            continue
        remote = f"{c.raddr.ip}:{c.raddr.port}"
        if c.laddr.port in mine or remote in theirs or f"[{c.raddr.ip}]:{c.raddr.port}" in theirs:
            fds.append(c.fd)
    return fds


def _header(command: int, x: mx.array | None = None, alone: bool = False) -> mx.array:
    if x is None:
        return mx.array([command, 0, 0, 0, 0, 0], dtype=mx.int32)
    b, n, d = x.shape
    return mx.array([command, b, n, d, DTYPES.index(x.dtype), int(alone)], dtype=mx.int32)


def _command(*values: int) -> mx.array:
    return mx.array(list(values) + [0] * (HEADER - len(values)), dtype=mx.int32)


class _Parts:
    def __init__(self, model, owner, decoder, slot, templates):
        self.model, self.owner, self.decoder, self.slot = model, owner, decoder, slot
        self.templates = templates

    def make_cache(self) -> list:
        if self.templates is not None:
            return [copy.deepcopy(t) for t in self.templates]
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.decoder.layers]


class ShardedModel:
    """Rank 0's model as mlx_lm's generators see it: a call runs the whole pipeline and returns
    the logits of the last position of each row. Its cache lists end with a SequenceTags entry
    (split_caches.py), which tells the other ranks which of their caches each row is."""

    def __init__(self, parts: _Parts, wire: Wire, world: int):
        self.parts = parts
        self.wire = wire
        self.world = world
        self.remote: set[int] = set()  # tags the other ranks may hold caches for

    @property
    def layers(self) -> list:
        return self.parts.decoder.layers

    def make_cache(self) -> list:
        """A new sequence: the other ranks start its caches at its first forward."""
        return self.parts.make_cache() + [SequenceTags([new_tag()])]

    def fork(self, cache: list) -> list:
        """A copy of a prompt-cache entry gets a tag of its own, and every rank copies its
        caches of the entry for it (the entry stays as it was for later turns)."""
        tags = cache[-1]
        (src,) = tags.tags
        dst = new_tag()
        tags.tags = [dst]
        if src in self.remote:
            self.wire.send_message(_command(FORK, src, dst), None, 1)
            self.remote.add(dst)
        return cache

    def __call__(self, inputs, cache=None, input_embeddings=None):
        cache, tags = cache[:-1], cache[-1].tags
        first = cache[0]
        alone = not isinstance(first, BatchKVCache)
        n = inputs.shape[1]
        if alone:
            lengths, padding = [first.offset], [0]
        else:
            lengths = first.offset.tolist()
            right = getattr(first, "_right_padding", None)
            padding = right.tolist() if right is not None else [0] * len(tags)
        self._drop_gone()
        if input_embeddings is not None:
            h = self.parts.decoder(inputs, cache, input_embeddings)
        else:
            h = self.parts.decoder(inputs, cache)
        rows = mx.array([[t, m, n - p] for t, m, p in zip(tags, lengths, padding)], dtype=mx.int32)
        mx.eval(h)
        self.wire.send(_header(FORWARD, h, alone), 1)
        self.wire.send(rows, 1)
        self.wire.send(h, 1)
        self.remote.update(tags)
        last = self.world - 1
        head = self.wire.recv_header(last)
        return self.wire.recv((head[1], head[2], head[3]), DTYPES[head[4]], last)

    def _drop_gone(self) -> None:
        gone = self.remote - live_tags()
        if gone:
            self.wire.send_message(_command(DROP, len(gone)), mx.array(sorted(gone), dtype=mx.int32), 1)
            self.remote -= gone

    def stop(self) -> None:
        self.wire.send_message(_header(STOP), None, 1)


def init_group(rank: int, world: int):
    """Join the ring the daemons described in MLX_HOSTFILE. Blocks until every rank is there,
    so call it before loading: the ring's connect retries last only a few seconds."""
    os.environ["MLX_RANK"] = str(rank)
    group = mx.distributed.init(backend="ring", strict=True)
    if group.size() != world or group.rank() != rank:
        raise RuntimeError(f"distributed group is rank {group.rank()} of {group.size()}, "
                           f"expected {rank} of {world}")
    return group


def load_first(model_dir: Path, shard: Shard, group):
    """Rank 0: (ShardedModel, tokenizer)."""
    from mlx_lm.utils import load_config, load_tokenizer

    parts = _Parts(*load_shard(model_dir, shard))
    config = load_config(Path(model_dir))
    tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
    return ShardedModel(parts, Wire(group), shard.world), tokenizer


def serve(model_dir: Path, shard: Shard, group, on_ready=lambda: None) -> None:
    """Ranks 1..N-1: receive, run own layers, pass on; until STOP (or the link breaks)."""
    parts = _Parts(*load_shard(model_dir, shard))
    wire = Wire(group)
    on_ready()
    _serve_loop(parts, wire, shard)


def _serve_loop(parts: _Parts, wire: Wire, shard: Shard) -> None:
    prev, nxt = shard.rank - 1, (shard.rank + 1) % shard.world
    caches = RankCaches(parts.make_cache)
    while True:
        head = wire.recv_header(prev)
        command = head[0]
        if command in (STOP, FORK):
            if not shard.last:
                wire.send_message(mx.array(head, dtype=mx.int32), None, nxt)
            if command == STOP:
                return
            caches.fork(head[1], head[2])
            continue
        if command == DROP:
            gone = wire.recv((head[1],), mx.int32, prev)
            if not shard.last:
                wire.send_message(mx.array(head, dtype=mx.int32), gone, nxt)
            caches.drop(gone.tolist())
            continue
        if command != FORWARD:
            raise RuntimeError(f"unknown pipeline command {command}")
        b, n, d, alone = head[1], head[2], head[3], bool(head[5])
        rows_in = wire.recv((b, 3), mx.int32, prev)
        rows = rows_in.tolist()
        tags, lengths, valid = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        parts.slot.value = wire.recv((b, n, d), DTYPES[head[4]], prev)
        cache = caches.for_forward(tags, lengths, alone)
        dummy = mx.zeros((b, n), mx.int32)
        if shard.last:
            owner = parts.owner
            decoder = owner["model"]
            owner["model"] = _LastPosition(decoder)
            try:
                out = owner(dummy, cache=cache)
            finally:
                owner["model"] = decoder
        else:
            out = parts.decoder(dummy, cache)
        mx.eval(out)
        caches.after_forward(tags, valid, n, alone)
        if shard.last:
            wire.send_message(_header(FORWARD, out), out, nxt)
        else:
            wire.send(mx.array(head, dtype=mx.int32), nxt)
            wire.send(rows_in, nxt)
            wire.send(out, nxt)


# -- runner processes ---------------------------------------------------------------------------


def first_rank_loop(model_dir: Path, shard: Shard, *, context_length: int, info, num_parallel: int,
                    prompt_cache_bytes: int, prefill_batch: int = 0):
    """Rank 0's generation loop: joins the ring, loads its layers, and batches like a local
    runner (no speculation). A family whose caches do not batch (sliding windows) decodes one
    request at a time."""
    group = init_group(shard.rank, shard.world)
    model, tokenizer = load_first(model_dir, shard, group)
    if not batchable(model.parts.templates):
        num_parallel = 1
    return SplitLoop(model, tokenizer, num_parallel=num_parallel, context_length=context_length,
                     info=info, prompt_cache_bytes=prompt_cache_bytes, prefill_batch=prefill_batch)


class SplitLoop(BatchLoop):
    """BatchLoop over a ShardedModel. A prompt-cache hit is a copy of the entry: every rank
    copies its own caches of it, so a chat's next turn prefills only its new tokens on each
    node."""

    def _cached(self, namespace: str, tokens: list[int]) -> tuple[list | None, list[int]]:
        cache, rest = super()._cached(namespace, tokens)
        if cache is not None:
            self.model.fork(cache)
        return cache, rest

    def _embed(self, job) -> None:
        job.emit(ErrorEvent("embeddings are not available from a model split across nodes", status=400))

    def _step_failed(self, exc: Exception) -> None:
        """A failed step may have left the ring half-way through a pass: the process ends, and
        the daemon sees the split lost at once (it resumes the answers elsewhere)."""
        raise exc


def serve_rank(model_dir: Path, shard: Shard, context_length: int) -> int:
    """Main of a runner that holds a middle or last part: prints the ready line, serves until
    STOP; exits when its stdin closes (the daemon stops it) or the ring breaks."""
    import sys
    import threading
    import time

    import psutil

    from hippod.protocol import ReadyEvent, encode

    def exit_when_stdin_closes() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, name="stdin", daemon=True).start()
    t0 = time.perf_counter()
    try:
        group = init_group(shard.rank, shard.world)
        parts = _Parts(*load_shard(model_dir, shard))
        wire = Wire(group)
    except BaseException as e:  # reported to the daemon, which shows it to the user
        message = f"could not load layers {shard.layers.arg()}: {type(e).__name__}: {e}"
        sys.stdout.write(encode(ErrorEvent(message, status=500)).decode())
        sys.stdout.flush()
        return 1
    ready = ReadyEvent(os.getpid(), time.perf_counter() - t0, psutil.Process().memory_info().rss,
                       mx.get_active_memory(), context_length,
                       device=str(mx.default_device().type).rsplit(".", 1)[-1])
    sys.stdout.write(encode(ready).decode())
    sys.stdout.flush()
    try:
        _serve_loop(parts, wire, shard)
    except BaseException:
        log.exception("the split's pipeline broke")
        os._exit(3)
    os._exit(0)
