"""Speculative decoding at known acceptance: speedup against plain decoding, and where a step goes.

    python bench/speculative.py --shape tiny --draft-shape tiny-draft --tokens 48     # CPU smoke run
    python bench/speculative.py --shape 8b-bf16 --draft-shape 1b --tokens 128       # on a GPU

Nothing trained can be downloaded, and a random draft agrees with a random target never, so the
mechanism is measured at acceptance we set, with every cost real:
  - oracle: the drafts are the target's own greedy continuation (from the plain run), free to
    make: the ceiling of speculation at acceptance 1.0;
  - draft-model / dflash: a real draft of the given shape runs its forwards (one per token, or
    one per block) and the target verifies; its guesses are then replaced, per round, by the
    first round(alpha * n) oracle tokens and one wrong one, so acceptance is alpha by
    construction and measured as accepted / drafted;
  - self-draft: no replacing at all. The target's layers after the first k are damped toward
    identity (their residual contributions scaled by epsilon), and its own first k layers
    draft for it: the acceptance is whatever epsilon gives, measured.
Every row's speedup is against plain decoding of the same target in the same run: raw mlx_lm
(generate_step), and hippo's loop drafting nothing. Greedy output must equal plain output in
every row ("same" column); the profile splits each mode's time into drafting, the target's
verify forward, accepting (sampling, comparing) and trimming caches.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from hippod.engine.dflash import load_dflash  # noqa: E402
from hippod.engine.drafts import ModelDrafter, damp_layers, self_draft  # noqa: E402
from hippod.engine.speculative import PHASES, Decoding, Stats, speculative_stream  # noqa: E402

VOCAB = 49152
SHAPES = {  # name: (layers, hidden, intermediate, heads, kv_heads)
    "tiny": (8, 256, 512, 8, 4),
    "tiny-draft": (2, 128, 256, 4, 2),
    "1b": (16, 2048, 8192, 32, 8),
    "3b": (28, 3072, 8192, 24, 8),
    "8b-bf16": (32, 4096, 14336, 32, 8),
}
DFLASH_LAYERS = {"tiny": 1, "1b": 2, "3b": 3, "8b-bf16": 5}


def make_llama(shape: str, dtype, seed: int):
    """A random llama of `shape`. Its head is sharpened so greedy choices are not near-ties
    (random weights give near-uniform logits, where numerics alone could flip a choice)."""
    layers, hidden, inter, heads, kv = SHAPES[shape]
    cfg = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
           "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
           "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "max_position_embeddings": 8192,
           "rope_theta": 500000.0, "tie_word_embeddings": False}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.lm_head.weight = model.lm_head.weight * 8.0
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, cfg


# -- proposers of the benchmark --------------------------------------------------------------


class OracleProposer:
    """Drafts the target's own continuation, at no cost: the ceiling."""
    taps: tuple[int, ...] = ()

    def __init__(self, oracle: list[int]):
        self.oracle = oracle

    def prefill(self, tokens, features) -> None:
        pass

    def propose(self, pending, n, history, decoding):
        at = len(history)
        guess = self.oracle[at:at + n]
        return mx.array(guess + [0] * (n - len(guess)), mx.uint32), None

    def commit(self, drafts, accepted, features) -> None:
        pass


class DialedProposer:
    """A real draft's forwards (cost), its guesses replaced so that acceptance is `alpha`: per
    round the first floor(alpha * n + u) tokens are the oracle's, the next one is wrong."""

    def __init__(self, inner, oracle: list[int], alpha: float, seed: int = 0):
        self.inner, self.oracle, self.alpha = inner, oracle, alpha
        self.taps = inner.taps
        self.rng = random.Random(seed)

    def prefill(self, tokens, features) -> None:
        self.inner.prefill(tokens, features)

    def propose(self, pending, n, history, decoding):
        drafts, probs = self.inner.propose(pending, n, history, decoding)
        mx.async_eval(drafts)  # the draft's work is done, whatever its guesses become
        n = drafts.shape[0]
        keep = min(n, int(self.alpha * n + self.rng.random()))
        at = len(history)
        right = (self.oracle[at:at + n] + [0] * n)[:n]
        if keep < n:
            right[keep] = (right[keep] + 1) % VOCAB
        return mx.array(right, mx.uint32), probs

    def commit(self, drafts, accepted, features) -> None:
        self.inner.commit(drafts, accepted, features)


# -- runs --------------------------------------------------------------------------------------


def plain_mlx_lm(model, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    out = []
    t0 = time.perf_counter()
    first = None
    for tok, _ in generate_step(mx.array(prompt, mx.uint32), model, max_tokens=tokens):
        out.append(int(tok))
        if first is None:
            first = time.perf_counter()
    return out, (len(out) - 1) / (time.perf_counter() - first)


def speculate(model, proposer, prompt: list[int], tokens: int, num_draft: int, profile: bool = False
              ) -> tuple[list[int], float, Stats]:
    cache = make_prompt_cache(model)
    stats = Stats()
    out = []
    stream = speculative_stream(model, proposer, cache, prompt, max_tokens=tokens, num_draft=num_draft,
                                decoding=Decoding(), stats=stats, profile=profile)
    first = None
    for tok, _ in stream:
        out.append(tok)
        if first is None:  # after the prefill and first round, as for plain
            first = time.perf_counter()
            stats.seconds = dict.fromkeys(PHASES, 0.0)
            stats.drafted = stats.accepted = stats.rounds = 0
    return out, (len(out) - 1) / (time.perf_counter() - first), stats


def mlx_lm_speculative(bench, label, model, draft, k, oracle, raw_tps) -> None:
    """The same draft through mlx_lm's own speculative_generate_step, for reference."""
    from mlx_lm.generate import speculative_generate_step

    def once():
        out, accepted, first = [], 0, None
        for tok, _, from_draft in speculative_generate_step(
                mx.array(bench.prompt, mx.uint32), model, draft, num_draft_tokens=k,
                max_tokens=bench.args.tokens):
            out.append(int(tok))
            accepted += bool(from_draft)
            if first is None:
                first = time.perf_counter()
        return out, (len(out) - 1) / (time.perf_counter() - first), accepted

    once()
    out, tps, accepted = once()
    bench.add(label, "  same draft, mlx_lm speculative", None, k, tps, raw_tps,
              out == oracle[len(bench.prompt):], None)
    bench.rows[-1]["accepted_tokens"] = accepted


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.prompt = [random.Random(1).randrange(100, VOCAB) for _ in range(args.prompt_tokens)]

    def plain(self, model, label: str) -> tuple[list[int], float, float]:
        """Plain decoding of this target, raw mlx_lm and hippo's loop; returns the oracle."""
        n = self.args.tokens
        plain_mlx_lm(model, self.prompt, n)  # warm-up: kernels for every cache size
        oracle, raw_tps = plain_mlx_lm(model, self.prompt, n)
        speculate(model, OracleProposer([]), self.prompt, n, 0)
        ours, ours_tps, stats = speculate(model, OracleProposer([]), self.prompt, n, 0)
        self.add(label, "plain (mlx_lm generate_step)", None, 0, raw_tps, raw_tps, ours == oracle, None)
        self.add(label, "plain (hippo loop, no draft)", None, 0, ours_tps, raw_tps, ours == oracle, stats)
        return self.prompt + oracle, raw_tps, ours_tps

    def measure(self, label: str, mode: str, model, make_proposer, num_draft: int, oracle: list[int],
                raw_tps: float, alpha=None) -> None:
        n = self.args.tokens
        speculate(model, make_proposer(), self.prompt, n, num_draft)  # warm-up
        out, tps, stats = speculate(model, make_proposer(), self.prompt, n, num_draft)
        # The profile syncs between phases, which costs overlap: a run of its own, not timed.
        _, _, profiled = speculate(model, make_proposer(), self.prompt, n, num_draft, profile=True)
        stats.seconds = profiled.seconds
        self.add(label, mode, alpha, num_draft, tps, raw_tps, out == oracle[len(self.prompt):], stats)

    def add(self, target, mode, alpha, k, tps, raw_tps, same, stats) -> None:
        row = {"target": target, "mode": mode, "alpha": alpha, "k": k, "tps": tps,
               "speedup": tps / raw_tps, "same": same}
        if stats is not None:
            row.update(drafted=stats.drafted, accepted=stats.accepted, rounds=stats.rounds,
                       seconds=dict(stats.seconds))
        self.rows.append(row)
        acc = f"{stats.accepted / stats.drafted:.2f}" if stats and stats.drafted else "-"
        print(f"  {mode:34} k={k:<2} alpha={alpha if alpha is not None else '-'!s:5} "
              f"acc={acc:5} {tps:8.1f} tok/s  {row['speedup']:.2f}x  same={same}", flush=True)


def run(args) -> Bench:
    dtype = getattr(mx, args.dtype)
    bench = Bench(args)
    modes = set(args.modes.split(","))
    target, cfg = make_llama(args.shape, dtype, seed=0)
    label = args.shape
    print(f"[{label}] plain", flush=True)
    oracle, raw_tps, _ = bench.plain(target, label)

    if "oracle" in modes:
        print(f"[{label}] oracle", flush=True)
        for k in sorted({*args.num_draft, args.block - 1}):
            bench.measure(label, "oracle", target, lambda: OracleProposer(oracle), k, oracle, raw_tps, 1.0)

    if "draft-model" in modes and args.draft_shape:
        print(f"[{label}] draft-model {args.draft_shape}", flush=True)
        draft, _ = make_llama(args.draft_shape, dtype, seed=1)
        drafter = ModelDrafter(draft)
        for k in args.num_draft:
            for alpha in args.alphas:
                bench.measure(label, f"draft-model {args.draft_shape}", target,
                              lambda: DialedProposer(drafter.proposer(drafter.make_cache()), oracle, alpha),
                              k, oracle, raw_tps, alpha)
        del draft, drafter
        gc.collect()

    if "dflash" in modes:
        import tempfile

        from bench.models import write_random_dflash

        print(f"[{label}] dflash block {args.block}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ddir = write_random_dflash(Path(tmp) / "dflash", cfg, num_layers=DFLASH_LAYERS.get(args.shape, 1),
                                       block_size=args.block, mask_token_id=VOCAB - 1,
                                       dtype=args.dtype)
            dflash = load_dflash(ddir, target)
        for alpha in args.alphas:
            bench.measure(label, f"dflash b{args.block}", target,
                          lambda: DialedProposer(dflash.proposer(dflash.make_cache()), oracle, alpha),
                          args.block - 1, oracle, raw_tps, alpha)
        del dflash
        gc.collect()

    if "self-draft" in modes:
        layers = SHAPES[args.shape][0]
        depth = args.self_layers or max(1, layers // 4)
        print(f"[{label}] self-draft: first {depth} of {layers} layers, the rest damped", flush=True)
        scale = 1.0
        for eps in args.epsilons:
            damp_layers(target, depth, eps / scale if scale else 0.0)
            scale = eps
            name = f"{label} eps={eps:g}"
            oracle_e, raw_e, _ = bench.plain(target, name)
            drafter = ModelDrafter(self_draft(target, depth))
            for k in args.num_draft:
                bench.measure(name, f"self-draft {depth} layers", target,
                              lambda: drafter.proposer(drafter.make_cache()), k, oracle_e, raw_e)
            mlx_lm_speculative(bench, name, target, drafter.model, args.num_draft[0], oracle_e, raw_e)
    return bench


def report(bench: Bench, args) -> str:
    lines = [f"hippo speculative decoding — {mx.default_device()}, {platform.machine()}, "
             f"{args.tokens} tokens, {args.dtype}, {time.strftime('%Y-%m-%d')}", "",
             "| target | mode | k | dialed α | acceptance | tokens/round | tok/s | vs mlx_lm plain | same as plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        acc = f"{r['accepted'] / r['drafted']:.2f}" if r.get("drafted") else "-"
        per_round = f"{(r['accepted'] + r['rounds']) / r['rounds']:.2f}" if r.get("rounds") else "-"
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        lines.append(f"| {r['target']} | {r['mode']} | {r['k']} | {alpha} | {acc} | {per_round} | "
                     f"{r['tps']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same'] else 'NO'} |")
    lines += ["", "Where a speculative round spends its time (ms per round and share, from a run that syncs "
              "between phases; `draft` includes committing the last round's context to the draft):", "",
              "| target | mode | α | " + " | ".join(PHASES) + " | round ms |",
              "|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for r in bench.rows:
        if not r.get("rounds") or not r.get("k"):
            continue
        total = sum(r["seconds"].values()) or 1e-9
        cells = [f"{1000 * r['seconds'][p] / r['rounds']:.2f} ({100 * r['seconds'][p] / total:.0f}%)"
                 for p in PHASES]
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        lines.append(f"| {r['target']} | {r['mode']} | {alpha} | " + " | ".join(cells)
                     + f" | {1000 * total / r['rounds']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--draft-shape", choices=sorted(SHAPES), help="the draft model's shape (draft-model mode)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=lambda s: [int(x) for x in s.split(",")], default=[4],
                    help="tokens a draft model drafts a round (a list: each is measured)")
    ap.add_argument("--block", type=int, default=16, help="DFlash block size (drafts block-1 tokens)")
    ap.add_argument("--alphas", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.8, 0.5])
    ap.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.1, 0.0],
                    help="damping of the target's deeper layers, for the self-draft rows")
    ap.add_argument("--self-layers", type=int, default=0, help="self-draft depth (default: a quarter)")
    ap.add_argument("--modes", default="oracle,draft-model,dflash,self-draft")
    ap.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU by default")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if mx.default_device().type == mx.gpu else "float32"
    t0 = time.perf_counter()
    bench = run(args)
    text = report(bench, args)
    print("\n" + text)
    print(f"\n(wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=1))
    return 0 if all(r["same"] for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
