"""Warm a spare runner for the models it will probably be handed, before any weights are read.

Tiny shapes compile tiny kernels: on CUDA most of a new runner's first forward pass is the JIT
of the model's own kernels (per dtype, bit width, group size and, for the BLAS heuristics, per
width), the library handles and mlx_lm's compiled functions. All of that stays with the process.
So the spare builds a ONE-layer random-weight model of each hinted model's architecture, widths,
dtype and quantization (read from its config.json and the safetensors headers), and runs what a
runner runs: prefills of a few lengths, decode steps alone (generate_step) and batched
(BatchGenerator). When the model it is then handed matches, its first token finds those
kernels ready.

Each step is small, so a handoff waits at most one step. The one-layer model never holds more
than `max_bytes`: a large vocabulary (the embedding and the head) is cut first, keeping its
alignment (what the kernels are chosen by); a layer that still does not fit is skipped.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from hippod.registry.modelinfo import read_safetensors_header

log = logging.getLogger("hippo.runner")

PREFILLS = (6, 40, 300)  # prompt lengths: matrix-vector vs matrix-matrix, one attention chunk
BATCHES = (2, 4, 8)  # decode batch sizes beside 1 (solo)
DECODE_STEPS = 3  # tokens decoded after each prefill
MIN_VOCAB = 256
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
Step = Callable[[], None]


@dataclass(frozen=True)
class WarmShape:
    """What decides a model's kernels, and the one-layer config that has it."""

    config: str  # JSON of the one-layer config (a string, so shapes compare and hash)
    dtype: str  # most tensors' float dtype
    dtypes: str  # JSON {tensor name: dtype} of the first layer's and the outer tensors
    vocab: int  # the model's real vocabulary
    source: Path

    @property
    def cfg(self) -> dict:
        return json.loads(self.config)

    @property
    def label(self) -> str:
        c = self.cfg
        q = c.get("quantization") or {}
        quant = f"q{q.get('bits')}g{q.get('group_size')}" if q else self.dtype
        return (f"{c.get('model_type')} h{c.get('hidden_size')} i{c.get('intermediate_size')} "
                f"v{c.get('vocab_size')} {quant}")


def _weights_dtypes(model_dir: Path) -> tuple[str, dict[str, str]]:
    """The float dtype most tensors have (a quantized model: its scales'), and each float
    tensor's own for the first layer and the tensors outside the layers (a model converted
    from GGUF keeps float32 norms beside float16 scales: its activations are float32)."""
    counts: dict[str, int] = {}
    own: dict[str, str] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, t in read_safetensors_header(shard).items():
            dtype = _FLOAT_DTYPES.get(t.get("dtype")) if isinstance(t, dict) else None
            if dtype is None:
                continue
            counts[dtype] = counts.get(dtype, 0) + 1
            if ".layers." not in name or ".layers.0." in name:
                own[name] = dtype
    return (max(counts, key=counts.get) if counts else "float16"), own


def _one_layer(cfg: dict) -> dict:
    """`cfg` cut to one decoder layer (with lists that hold a value per layer cut too)."""
    cfg = dict(cfg)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in cfg:
            cfg[key] = 1
    for key, value in list(cfg.items()):
        if isinstance(value, list) and layers and len(value) == layers:
            cfg[key] = value[:1]
    return cfg


def read_shape(model_dir: Path) -> WarmShape | None:
    """The warm shape of a model directory from its config.json and safetensors headers; None
    when it has none hippo can build (no config, a custom model file, not a text model)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        if not isinstance(cfg, dict) or "model_type" not in cfg or cfg.get("model_file"):
            return None
        dtype, dtypes = _weights_dtypes(Path(model_dir))
        vocab = int(cfg.get("vocab_size") or 0)
    except (OSError, ValueError, TypeError):
        return None
    if vocab <= 0:
        return None
    return WarmShape(json.dumps(_one_layer(cfg), sort_keys=True), dtype,
                     json.dumps(dtypes, sort_keys=True), vocab, Path(model_dir))


def with_vocab(shape: WarmShape, vocab: int) -> WarmShape:
    cfg = shape.cfg
    cfg["vocab_size"] = vocab
    return WarmShape(json.dumps(cfg, sort_keys=True), shape.dtype, shape.dtypes, shape.vocab, shape.source)


def _build_lazy(shape: WarmShape):
    """The one-layer model, its parameters not yet evaluated (so they cost nothing yet)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    cfg = shape.cfg
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    model.set_dtype(getattr(mx, shape.dtype))
    own = json.loads(shape.dtypes)
    for prefix, module in model.named_modules():  # tensors the files keep in another dtype
        for name, p in module.parameters().items():
            dtype = own.get(f"{prefix}.{name}" if prefix else name)
            if isinstance(p, mx.array) and dtype and mx.issubdtype(p.dtype, mx.floating):
                module[name] = p.astype(getattr(mx, dtype))
    q = cfg.get("quantization")
    if isinstance(q, dict) and q.get("bits"):
        def predicate(path, module):  # as mlx_lm.load: per-layer settings, else every fitting one
            if path in q:
                return q[path]
            weight = getattr(module, "weight", None)
            return (hasattr(module, "to_quantized") and weight is not None
                    and weight.shape[-1] % int(q["group_size"]) == 0)

        nn.quantize(model, group_size=int(q["group_size"]), bits=int(q["bits"]),
                    mode=q.get("mode", "affine"), class_predicate=predicate)
    model.eval()
    return model


def _activation_bytes(cfg: dict) -> int:
    """What the largest warm pass holds besides the weights (a generous bound): a prefill's
    activations and attention scores, the KV of the largest batch, and a batch of logits
    (a prefill computes the logits of its last token only)."""
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("moe_intermediate_size") or hidden * 4)
    heads = int(cfg.get("num_attention_heads") or 1)
    vocab = int(cfg.get("vocab_size") or 0)
    tokens = max(max(PREFILLS), max(BATCHES) * (PREFILLS[0] + DECODE_STEPS))
    return (tokens * (4 * inter + 8 * hidden) * 4 + heads * max(PREFILLS) ** 2 * 4
            + max(BATCHES) * vocab * 8)


def model_bytes(shape: WarmShape) -> int:
    """Bytes the one-layer model holds while warming: its weights, the largest weight once
    more while it is made, and the activations of the largest pass."""
    from mlx.utils import tree_flatten

    sizes = [v.nbytes for _, v in tree_flatten(_build_lazy(shape).parameters())]
    return sum(sizes) + max(sizes, default=0) + _activation_bytes(shape.cfg)


def _alignment(vocab: int) -> int:
    return min(vocab & -vocab, 256)


def fit(shape: WarmShape, max_bytes: int) -> WarmShape | None:
    """`shape`, its vocabulary cut (to a multiple of the same power of two, up to 256) until
    the warm model fits in `max_bytes`; None when even the smallest does not fit."""
    if model_bytes(shape) <= max_bytes:
        return shape
    align = _alignment(shape.vocab)
    small = with_vocab(shape, max(align, MIN_VOCAB // align * align))
    if model_bytes(small) > max_bytes:
        return None
    lo, hi = small.cfg["vocab_size"] // align, shape.vocab // align  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if model_bytes(with_vocab(shape, mid * align)) <= max_bytes:
            lo = mid
        else:
            hi = mid
    return with_vocab(shape, lo * align)


def shapes_for(model_dirs: list[Path], max_bytes: int, seen: set | None = None) -> list[WarmShape]:
    """The distinct warm shapes of `model_dirs` (and not in `seen`), in their order, each
    fitted to `max_bytes`."""
    seen, out = set() if seen is None else seen, []
    for d in model_dirs:
        shape = read_shape(d)
        if shape is None or (shape.config, shape.dtypes) in seen:
            continue
        seen.add((shape.config, shape.dtypes))
        try:
            fitted = fit(shape, max_bytes)
        except Exception as e:  # an architecture mlx_lm cannot build from its config alone
            log.info("spare warm-up: %s cannot be built without weights (%s)", d, e)
            continue
        if fitted is None:
            log.info("spare warm-up: one layer of %s does not fit in %d bytes: skipped", d, max_bytes)
            continue
        out.append(fitted)
    return out


def _randomize(model) -> None:
    """Give every parameter random values of its own shape and dtype, made one array at a time
    (the layers' own init would make full-precision weights first), scaled like a trained
    model's: activations that overflow to inf and NaN run far slower on a CPU."""
    import math

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    for _, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        params = dict(tree_flatten(module.parameters()))
        bits, group = getattr(module, "bits", None), getattr(module, "group_size", None)
        fan_in = params["weight"].shape[-1] if "weight" in params else 1
        if bits and "scales" in params:
            fan_in = params["scales"].shape[-1] * group
        new = {}
        for name, p in params.items():
            if p.dtype == mx.uint32:  # packed quantized weights: any bits are values
                value = mx.random.randint(0, 2**31 - 1, p.shape, dtype=mx.int32).view(mx.uint32)
            elif name == "scales" and bits:
                step = 2.0 / (2**bits * math.sqrt(fan_in))  # values within +-1/sqrt(fan_in)
                value = (mx.full(p.shape, step, dtype=p.dtype) if mx.issubdtype(p.dtype, mx.floating)
                         else mx.full(p.shape, 127 - 3, dtype=p.dtype))  # an e8m0 exponent: 1/8
            elif name == "biases" and bits:
                value = mx.full(p.shape, -(2**bits - 1) / (2**bits * math.sqrt(fan_in)), dtype=p.dtype)
            elif not mx.issubdtype(p.dtype, mx.floating):
                value = mx.zeros(p.shape, dtype=p.dtype)
            elif "norm" in type(module).__name__.lower() or name == "bias":
                value = (mx.ones if name == "weight" else mx.zeros)(p.shape, dtype=p.dtype)
            else:
                value = (mx.random.normal(p.shape, dtype=p.dtype) * fan_in ** -0.5).astype(p.dtype)
            mx.eval(value)
            new[name] = value
        module.update(_unflatten(new))


def _unflatten(flat: dict) -> dict:
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def build(shape: WarmShape):
    """The one-layer model of `shape`, with random weights."""
    model = _build_lazy(shape)
    _randomize(model)
    return model


def _prompt(n: int, vocab: int, salt: int = 0) -> list[int]:
    return [(7 + 31 * i + 17 * salt) % vocab for i in range(n)]


def steps_for(shape: WarmShape) -> Iterator[Step]:
    """The warm passes of one shape, one small step each; the model is freed at the end (and
    when the caller stops early and closes this generator)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from hippod.engine.batch_loop import PREFILL_STEP
    from hippod.engine.sampling import make_request_sampler

    held: dict = {}
    vocab = shape.cfg["vocab_size"]
    samplers = (make_request_sampler({}), make_request_sampler({"temperature": 0}))

    def build_it() -> None:
        held["model"] = build(shape)

    try:
        yield build_it
        for i, n in enumerate(PREFILLS):  # alone: generate_step, as a lone request runs
            sampler = samplers[i % 2]

            def start(n=n, sampler=sampler) -> None:
                model = held["model"]
                held["solo"] = generate_step(mx.array(_prompt(n, vocab)), model, max_tokens=DECODE_STEPS,
                                             sampler=sampler, prompt_cache=make_prompt_cache(model))
                next(held["solo"])

            yield start
            for _ in range(DECODE_STEPS - 1):
                yield lambda: next(held["solo"], None)
        held.pop("solo", None)
        for b in BATCHES:  # together: prompts of different lengths, as a burst arrives
            def insert(b=b) -> None:
                gen = BatchGenerator(held["model"], completion_batch_size=b, prefill_batch_size=b,
                                     prefill_step_size=PREFILL_STEP)
                gen.insert([_prompt(PREFILLS[0] + k, vocab, k) for k in range(b)],
                           max_tokens=[DECODE_STEPS] * b,
                           samplers=[samplers[k % 2] for k in range(b)])
                held["batch"], held["left"] = gen, b

            def step() -> None:
                gen = held.get("batch")
                if gen is None:
                    return
                _, responses = gen.next()
                held["left"] -= sum(1 for r in responses if r.finish_reason is not None)
                if held["left"] <= 0:
                    held.pop("batch").close()

            yield insert
            for _ in range(2 * DECODE_STEPS + 2):  # prefill, then decode until all are done
                yield step
            gen = held.pop("batch", None)
            if gen is not None:
                gen.close()
    finally:
        held.clear()
        gc.collect()
        mx.clear_cache()


def warm_steps(model_dirs: list[Path], max_bytes: int) -> Iterator[Step]:
    """The steps of every hinted shape that fits, the most likely model first; reading and
    fitting a model's shape is a step of its own too."""
    if max_bytes <= 0:
        return
    seen: set = set()
    for d in model_dirs:
        found: list[WarmShape] = []
        yield lambda d=d: found.extend(shapes_for([Path(d)], max_bytes, seen))
        for shape in found:
            log.info("spare warm-up: like %s (%s)", d, shape.label)
            yield from steps_for(shape)
