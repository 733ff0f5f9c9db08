"""The runner's prompt cache: finished sequences' KV, found again by the longest shared prefix.

mlx_lm's LRUPromptCache keeps the entries in a token trie. Its search for the nearest entry
also walks every cached sequence that shares even a few tokens with the prompt (to find a longer
one to trim), and copies the KV it finds. That is paid in admission, for each request of a burst
before any of them prefills: with 64 entries, inserting a burst of 32 fresh prompts took 58-74 ms
on an H200 host (bench/engine_burst.py). A prefix shorter than MIN_REUSE tokens is never reused,
so a prompt whose first MIN_REUSE tokens begin no cached sequence is answered at once, from a set
of those heads, without a search.
"""

from __future__ import annotations

from collections import OrderedDict

from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from hippod.engine.speculative import trim_to

MIN_REUSE = 16  # shortest cached prefix worth reusing, in tokens
HEADS_KEPT = 16  # heads remembered per entry the cache can hold (entries it dropped may linger)


class PromptCache:
    def __init__(self, max_size: int, max_bytes: int):
        self.entries = LRUPromptCache(max_size=max_size, max_bytes=max_bytes)
        # The first MIN_REUSE tokens of every sequence inserted lately, per namespace. Remembered
        # for HEADS_KEPT times more insertions than the cache keeps entries, so a head is never
        # forgotten while its entry may still be cached (it may be remembered a while after).
        self.heads: OrderedDict[tuple, None] = OrderedDict()
        self.heads_kept = HEADS_KEPT * max_size

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.trim_to(n_sequences=0)
        self.heads.clear()

    def nearest(self, namespace: str, tokens: list[int]) -> tuple[list | None, list[int]]:
        """The longest cached prefix's KV (a copy) and the tokens still to process (never
        none); (None, tokens) when nothing of MIN_REUSE tokens or more is cached."""
        if (namespace, *tokens[:MIN_REUSE]) not in self.heads:
            return None, tokens
        cache, rest = self.entries.fetch_nearest_cache(namespace, tokens)
        if cache is not None and len(tokens) - len(rest) < MIN_REUSE:
            return None, tokens  # a few shared tokens save nothing; a fresh cache is simpler
        if cache is not None and not rest:
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, rest

    def remember(self, namespace: str, tokens: list[int], cache: list) -> None:
        """Keep a finished sequence's KV under the tokens it holds. The caches of one entry
        (target and draft) are trimmed to one length first: a speculative round may have left
        them a token apart, or past the tokens the request kept."""
        if not cache or not all(hasattr(c, "offset") for c in cache):
            return
        held = trim_to(cache, len(tokens))
        if held < MIN_REUSE:
            return  # too short to be reused, ever
        self.entries.insert_cache(namespace, list(tokens[:held]), cache)
        head = (namespace, *tokens[:MIN_REUSE])
        self.heads[head] = None
        self.heads.move_to_end(head)
        while len(self.heads) > self.heads_kept:
            self.heads.popitem(last=False)
