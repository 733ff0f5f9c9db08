"""Which sequence each row of a batch is, on every rank of a split, and each rank's KV for it.

Rank 0 runs mlx_lm's BatchGenerator over the split model. The generator merges, extends,
filters, splits, copies and extracts its per-layer caches as sequences come and go; the other
ranks must know which of their own KV caches belongs to which row. So rank 0's cache list
carries one more entry, a `SequenceTags` that holds no keys, only one tag per row, and goes
through every one of those operations with the layer caches (mlx_lm calls them on every entry).
Each forward then tells the other ranks the row tags and lengths; a rank keeps its caches per
tag (`RankCaches`), reuses its batch while the rows stay the same (every decoding step), and
rebuilds it from per-sequence caches when they change. A tag no cache on rank 0 holds any more
(the sequence finished and left the prompt cache) is dropped on every rank.
"""

from __future__ import annotations

import copy
import itertools
import weakref

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, _BaseCache, trim_prompt_cache

_tags = itertools.count(1)
_holders: "weakref.WeakSet[SequenceTags]" = weakref.WeakSet()


def new_tag() -> int:
    return next(_tags)


def live_tags() -> set[int]:
    """Tags some cache on this rank still holds (a running row or a prompt-cache entry)."""
    return {t for holder in list(_holders) for t in holder.tags}


class SequenceTags(_BaseCache):
    """The rows' sequence tags, as one more entry of rank 0's cache list: it follows the
    generator's structural operations and ignores the ones about keys (trim, prepare)."""

    def __init__(self, tags: list[int]):
        self.tags = list(tags)
        _holders.add(self)

    def __setstate__(self, state):  # a deepcopy (the prompt cache's fetch, a batch split)
        self.__dict__.update(state)
        _holders.add(self)

    @property
    def state(self):
        return ()

    @state.setter
    def state(self, v):
        pass

    @property
    def offset(self):
        """Never the shortest cache of a list: the layer caches say how long a sequence is."""
        return 1 << 62

    def is_trimmable(self):
        return True

    def trim(self, n):
        return n

    def prepare(self, **kwargs):
        pass

    def finalize(self):
        pass

    def size(self):
        return 0

    def empty(self):
        return False

    @property
    def nbytes(self):
        return 0

    @classmethod
    def merge(cls, caches):
        return cls([t for c in caches for t in c.tags])

    def extend(self, other):
        self.tags.extend(other.tags)

    def filter(self, batch_indices):
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        self.tags = [self.tags[i] for i in keep]

    def extract(self, idx):
        return SequenceTags([self.tags[idx]])


def batchable(templates: list | None) -> bool:
    """Only plain KV caches batch across ranks (rotating and other caches decode one at a time)."""
    return templates is None or all(type(t) is KVCache for t in templates)


class RankCaches:
    """One rank's KV per sequence tag, and the batch of the last forward."""

    def __init__(self, make_cache):
        self.make_cache = make_cache
        self.single: dict[int, list] = {}  # tag -> this rank's caches of that sequence
        self.batch: list | None = None  # the merged caches of `batch_tags`, in row order
        self.batch_tags: list[int] = []
        self.batch_lengths: list[int] = []

    def drop(self, tags: list[int]) -> None:
        if any(t in self.batch_tags for t in tags):
            self._flush()
        for t in tags:
            self.single.pop(t, None)

    def fork(self, src: int, dst: int) -> None:
        if src in self.batch_tags:
            self._flush()
        if src in self.single:
            self.single[dst] = copy.deepcopy(self.single[src])

    def for_forward(self, tags: list[int], lengths: list[int], alone: bool) -> list:
        """The cache list to run this forward with: a sequence's own caches when it decodes
        alone, else the batch (rebuilt only when its rows changed)."""
        if not alone and tags == self.batch_tags and lengths == self.batch_lengths:
            return self.batch
        self._flush()
        caches = [self._sequence(t, n) for t, n in zip(tags, lengths)]
        if alone:
            return caches[0]
        self.batch = [BatchKVCache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]
        self.batch_tags, self.batch_lengths = list(tags), list(lengths)
        return self.batch

    def after_forward(self, tags: list[int], valid: list[int], width: int, alone: bool) -> None:
        """Right padding of a batched prefill moves to the left, as the generator does."""
        if alone:
            return
        padding = [width - v for v in valid]
        if any(padding):
            for c in self.batch:
                c._right_padding = mx.array(padding)
                c.finalize()
        self.batch_lengths = [n + v for n, v in zip(self.batch_lengths, valid)]

    def _sequence(self, tag: int, length: int) -> list:
        caches = self.single.get(tag)
        if caches is None:
            if length:
                raise RuntimeError(f"rank 0 continues sequence {tag} at {length} tokens, "
                                   "which this rank does not hold")
            caches = self.single[tag] = self.make_cache()
        held = caches[0].offset
        if held < length:
            raise RuntimeError(f"sequence {tag}: this rank holds {held} tokens, rank 0 {length}")
        if held > length:
            trim_prompt_cache(caches, held - length)
        return caches

    def _flush(self) -> None:
        """The batch's rows back into per-sequence caches."""
        if self.batch is not None:
            for i, tag in enumerate(self.batch_tags):
                self.single[tag] = [c.extract(i) for c in self.batch]
        self.batch, self.batch_tags, self.batch_lengths = None, [], []
