"""The runner's prompt cache, on real mlx_lm KV caches: a prompt finds the longest cached prefix
of MIN_REUSE tokens or more, and the index that lets fresh prompts skip the trie search never
hides an entry that is still cached, nor grows without bound."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from hippod.engine.prompt_cache import MIN_REUSE, PromptCache


def kv(tokens: int) -> list:
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, tokens, 4)), mx.zeros((1, 2, tokens, 4)))
    return [cache]


def test_a_prompt_reuses_the_longest_cached_prefix_of_min_reuse_tokens_or_more():
    pc = PromptCache(max_size=4, max_bytes=1 << 30)
    base = list(range(100, 140))
    pc.remember("main", base, kv(len(base)))
    cache, rest = pc.nearest("main", base[:30] + [7, 8, 9])
    assert cache is not None and cache[0].offset == 30 and rest == [7, 8, 9]
    cache, rest = pc.nearest("main", base)  # all of it cached: the last token is still to feed
    assert cache[0].offset == len(base) - 1 and rest == base[-1:]
    short = base[:MIN_REUSE - 1] + [1, 2, 3]
    assert pc.nearest("main", short) == (None, short)  # too little shared to be worth it
    assert pc.nearest("spec", base)[0] is None  # another namespace
    fresh = list(range(500, 540))
    assert pc.nearest("main", fresh) == (None, fresh)
    tiny = base[:MIN_REUSE - 2]
    pc.remember("main", tiny, kv(len(tiny)))  # never reusable: not kept
    assert len(pc) == 1


def test_evicted_entries_are_not_found_and_the_head_index_stays_bounded():
    pc = PromptCache(max_size=4, max_bytes=1 << 30)
    seqs = [[i] * 20 + [1000 + i] for i in range(3 * pc.heads_kept)]
    for s in seqs:
        pc.remember("main", s, kv(len(s)))
    assert len(pc) == 4 and len(pc.heads) <= pc.heads_kept
    for s in seqs[-4:]:  # the ones still cached are all found
        cache, rest = pc.nearest("main", s[:20] + [5])
        assert cache is not None and cache[0].offset == 20, s[0]
    assert pc.nearest("main", seqs[0][:20] + [5])[0] is None  # evicted long ago
    pc.clear()
    assert len(pc) == 0 and pc.nearest("main", seqs[-1])[0] is None
