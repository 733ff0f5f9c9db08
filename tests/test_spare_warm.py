"""The spare's warm-up model: one layer of the hinted model's architecture, widths, dtypes and
quantization, built from config.json and the safetensors headers alone, within a byte allowance,
run through real MLX in small steps that a handoff stops; and a swap through a real hippod
into a spare warmed that way. (What it saves on a GPU: bench/hotswap.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import psutil
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from bench.models import make_tiny_llama, smollm2_mlx_dir
from hippod.engine import warm
from hippod.engine.runner import warm_up
from tests.daemon import Daemon


@pytest.fixture(scope="module")
def smol() -> Path:
    return smollm2_mlx_dir()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("warm") / "q", num_layers=3, hidden_size=128,
                           intermediate_size=384, num_heads=4, num_kv_heads=2, quantize=True, seed=3)


def _params(model) -> dict:
    return {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}


def _quant(model) -> dict:
    return {name: (m.bits, m.group_size) for name, m in model.named_modules() if hasattr(m, "bits")}


@pytest.mark.parametrize("which", ["smol", "quantized"])
def test_the_warm_model_is_one_layer_of_the_real_one(which, request):
    model_dir = request.getfixturevalue(which)
    real, _ = load(str(model_dir))
    shape = warm.read_shape(model_dir)
    model = warm.build(shape)
    params, real_params = _params(model), _params(real)
    assert len(model.layers) == 1 and len(real.layers) > 1
    # Every tensor of the warm model is the real model's tensor of that name: shape and dtype
    # (a GGUF conversion keeps float32 norms beside float16 scales), and every layer-0 and
    # outer tensor of the real model is there.
    assert params == {k: v for k, v in real_params.items() if ".layers." not in k or ".layers.0." in k}
    assert _quant(model) == {k: v for k, v in _quant(real).items() if ".layers." not in k or ".layers.0." in k}
    if which == "smol":  # its embedding is 8-bit, its layers 4-bit, group 32
        assert _quant(model)["model.embed_tokens"] == (8, 32)
        assert _quant(model)["model.layers.0.self_attn.q_proj"] == (4, 32)
    out = model(mx.array([[1, 2, 3]]))
    assert out.shape == (1, 3, shape.vocab) and not mx.isnan(out).any().item()


def test_the_allowance_cuts_the_vocabulary_and_is_never_exceeded(smol):
    shape = warm.read_shape(smol)
    full = warm.model_bytes(shape)
    allowance = full // 2
    fitted = warm.fit(shape, allowance)
    vocab = fitted.cfg["vocab_size"]
    assert vocab < shape.vocab and vocab % 256 == 0  # cut, keeping the alignment kernels see
    assert warm.model_bytes(fitted) <= allowance < warm.model_bytes(warm.with_vocab(fitted, vocab + 256))
    assert warm.fit(shape, 10**6) is None  # not even the smallest vocabulary fits: skipped

    base = mx.get_active_memory()
    mx.reset_peak_memory()
    steps = sum(1 for step in warm.warm_steps([smol], allowance) if step() or True)
    assert steps > 10
    assert 0 < mx.get_peak_memory() - base <= allowance
    assert mx.get_active_memory() - base < 2**20  # the warm model is gone afterwards

    mx.reset_peak_memory()
    assert [step() for step in warm.warm_steps([smol], 10**6)] == [None]  # read, found too big
    assert mx.get_peak_memory() - base < 2**20


def test_stop_interrupts_the_warm_up_between_steps(smol):
    calls = []

    def stop_after(n):
        def stop():
            calls.append(1)
            return len(calls) > n
        return stop

    base = mx.get_active_memory()
    assert warm_up(stop_after(3), like=[smol], max_bytes=2**30) == 3  # read, build, first prefill
    assert mx.get_active_memory() - base < 2**20  # a model left half-used is freed

    # From another thread, as the spare's handoff does: the warm-up ends within one step.
    done: list[int] = []
    flag = threading.Event()
    steps_seen = []

    def stop() -> bool:
        steps_seen.append(1)
        return flag.is_set()

    thread = threading.Thread(target=lambda: done.append(warm_up(stop, like=[smol], max_bytes=2**30)))
    thread.start()
    while len(steps_seen) < 6:
        time.sleep(0.01)
    flag.set()
    thread.join(timeout=60)
    assert not thread.is_alive() and done
    total = sum(1 for step in warm.warm_steps([smol], 2**30) if step() or True)
    assert 5 <= done[0] < total


def test_a_paused_warm_up_runs_no_step_and_a_handoff_still_ends_it_at_once(smol):
    """While models serve, the warm-up holds before its next step; the daemon naming a model
    (stop) ends a held warm-up without it running a step first."""
    paused, named = threading.Event(), threading.Event()
    paused.set()
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(
        warm_up(named.is_set, like=[smol], max_bytes=2**30, paused=paused)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # held, not finished
    named.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and done == [0]

    paused.set()  # held, then let go: every step runs
    thread = threading.Thread(target=lambda: done.append(
        warm_up(lambda: False, like=[smol], max_bytes=2**30, paused=paused)))
    thread.start()
    time.sleep(0.3)
    paused.clear()
    thread.join(timeout=120)
    total = sum(1 for step in warm.warm_steps([smol], 2**30) if step() or True)
    assert done[1] == total


def test_with_no_hint_that_fits_the_common_kernels_are_warmed(smol):
    from hippod.engine.runner import warm_steps

    common = sum(1 for _ in warm_steps())
    assert warm_up() == common
    assert warm_up(like=[smol], max_bytes=10**6) == 1 + common  # read, too big; then the common ones
    calls = iter(range(100))
    assert warm_up(lambda: next(calls) >= 2) == 2


def test_hints_that_cannot_be_built_are_skipped(tmp_path, smol):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture", "vocab_size": 10}')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("not json")
    shapes = warm.shapes_for([tmp_path, tmp_path / "bad", tmp_path / "missing", smol, smol], 2**30)
    assert [s.source for s in shapes] == [smol]  # once, however often it is named


def _hints(pid: int) -> list[Path]:
    """The model dirs a spare process was told to warm for (its --warm-like arguments)."""
    argv = psutil.Process(pid).cmdline()
    rest = argv[argv.index("--warm-like") + 1:]
    return [Path(x) for x in rest[:next((i for i, x in enumerate(rest) if x.startswith("--")), len(rest))]]


def _same_weights(model_dir: Path) -> Path | None:
    """Which of the test's source models `model_dir` (inside hippod's home) holds."""
    data = (model_dir / "model.safetensors").read_bytes()
    return next((src for src in _SOURCES if (src / "model.safetensors").read_bytes() == data), None)


_SOURCES: list[Path] = []


@pytest.mark.slow
def test_a_swap_into_a_spare_warmed_for_it_generates_what_mlx_lm_does(tmp_path):
    a, b = (make_tiny_llama(tmp_path / n, num_layers=2, hidden_size=128, intermediate_size=256,
                            seed=i) for i, n in enumerate("ab"))
    _SOURCES[:] = [a, b]
    d = Daemon(tmp_path / "home", env={"HIPPO_SPARE_RUNNER": "1", "HIPPO_MAX_LOADED_MODELS": "1",
                                       "HIPPO_MEMORY_BUDGET": "8GB", "HIPPO_NUM_CTX": "1024"}).start()
    try:
        for name, path in (("a", a), ("b", b)):
            status, body = d.request("POST", "/api/create", {"model": name, "from": str(path), "stream": False})
            assert status == 200, body
        status, body = d.request("POST", "/api/generate", {"model": "a", "prompt": ""}, timeout=300)
        assert status == 200, body
        deadline = time.monotonic() + 180
        while True:
            _, st = d.request("GET", "/api/hippo/status")
            if st["spare"]["state"] == "warm" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        spare = st["spare"]
        assert spare["state"] == "warm" and spare["warm_max_bytes"] > 0, spare
        runners_log = (tmp_path / "home" / "logs" / "runners.log").read_text()
        assert "spare warm-up: like" in runners_log  # it warmed a one-layer copy of a
        assert [_same_weights(h) for h in _hints(spare["pid"])] == [a]

        prompt = "The lighthouse keeper climbed"
        status, body = d.request("POST", "/api/generate", {
            "model": "b", "prompt": prompt, "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 8}}, timeout=300)
        assert status == 200 and body["eval_count"] == 8, body
        _, ps = d.request("GET", "/api/ps")
        assert [m["hippo"]["pid"] for m in ps["models"]] == [spare["pid"]]  # b went into the spare
        while (nxt := d.request("GET", "/api/hippo/status")[1]["spare"]).get("pid") in (None, spare["pid"]):
            assert time.monotonic() < deadline + 180
            time.sleep(0.2)
        # The next spare warms for b first (loaded last), then a (unloaded before it).
        assert [_same_weights(h) for h in _hints(nxt["pid"])] == [b, a]
    finally:
        d.stop()
    from mlx_lm import generate

    model, tok = load(str(b))
    assert body["response"] == generate(model, tok, tok.encode(prompt), max_tokens=8)
