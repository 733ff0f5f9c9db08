"""Pipeline planning: which node runs which layers of a model too big for one machine.

A pure function of the nodes' free memory and the model's sizes, so it is easy to test. Layers
are split into contiguous ranges, one per node in the given order (the first node embeds and
samples, the last applies the final norm and LM head), proportional to what each node can hold
beyond its fixed costs, like exo's memory-weighted placement. Every node gets at least one
layer; a plan where some node would not fit is repaired by filling nodes in order, and when
nothing fits the refusal says what was needed and what was free.
"""

from __future__ import annotations

from dataclasses import dataclass

from hippod.config import fmt_bytes
from hippod.protocol import LayerRange


@dataclass(frozen=True)
class Node:
    name: str
    free: int  # bytes its memory guard can still give a model


@dataclass(frozen=True)
class ModelParts:
    layers: tuple[int, ...]  # bytes of each decoder layer: weights plus its KV cache
    first: int  # embeddings and anything else outside the layers: on the first node
    last: int  # final norm and LM head (and the embeddings again when tied): on the last node
    overhead: int  # a runner process's fixed cost, paid on every node

    @property
    def total(self) -> int:
        """Bytes of the whole model on one node."""
        return sum(self.layers) + self.first + self.last + self.overhead

    def split_total(self, nodes: int) -> int:
        return sum(self.layers) + self.first + self.last + nodes * self.overhead


@dataclass(frozen=True)
class Share:
    node: str
    layers: LayerRange
    bytes: int  # what the node's runner is expected to take

    @property
    def start(self) -> int:
        return self.layers.start

    @property
    def end(self) -> int:
        return self.layers.end


class PlanRefused(Exception):
    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed = needed
        self.available = available


def share_bytes(parts: ModelParts, index: int, count: int, start: int, end: int) -> int:
    fixed = parts.overhead + (parts.first if index == 0 else 0) + (parts.last if index == count - 1 else 0)
    return fixed + sum(parts.layers[start:end])


def _shares(nodes: list[Node], parts: ModelParts, bounds: list[int]) -> list[Share]:
    k = len(nodes)
    return [Share(n.name, LayerRange(bounds[i], bounds[i + 1]),
                  share_bytes(parts, i, k, bounds[i], bounds[i + 1])) for i, n in enumerate(nodes)]


def _fits(nodes: list[Node], shares: list[Share]) -> bool:
    return all(s.bytes <= n.free for n, s in zip(nodes, shares))


def _proportional(nodes: list[Node], parts: ModelParts) -> list[int]:
    """Boundaries that give each node layer bytes in proportion to its room beyond fixed costs."""
    n, k = len(parts.layers), len(nodes)
    room = [max(nodes[i].free - share_bytes(parts, i, k, 0, 0), 0) for i in range(k)]
    whole = sum(room) or k
    weights = room if sum(room) else [1] * k
    cumulative = [0]
    for size in parts.layers:
        cumulative.append(cumulative[-1] + size)
    bounds = [0]
    share = 0
    for i in range(k - 1):
        share += weights[i]
        target = cumulative[-1] * share / whole
        lo, hi = bounds[-1] + 1, n - (k - 1 - i)
        best = min(range(lo, hi + 1), key=lambda j: (abs(cumulative[j] - target), j))
        bounds.append(best)
    bounds.append(n)
    return bounds


def _fill(nodes: list[Node], parts: ModelParts) -> list[int]:
    """Boundaries from giving each node, in order, as many layers as it holds (leaving one for
    each node after it): finds a plan whenever any contiguous plan exists."""
    n, k = len(parts.layers), len(nodes)
    bounds = [0]
    for i in range(k - 1):
        end = bounds[-1] + 1
        while end < n - (k - 1 - i) and share_bytes(parts, i, k, bounds[-1], end + 1) <= nodes[i].free:
            end += 1
        bounds.append(end)
    bounds.append(n)
    return bounds


def plan(nodes: list[Node], parts: ModelParts, model: str = "the model") -> list[Share]:
    """Contiguous layer ranges for `nodes` in this order, or PlanRefused with the numbers."""
    n, k = len(parts.layers), len(nodes)
    if k < 1:
        raise ValueError("a plan needs at least one node")
    if k > n:
        raise PlanRefused(f"{model} has {n} layers, too few to give each of {k} nodes one",
                          parts.split_total(k), sum(x.free for x in nodes))
    for bounds in (_proportional(nodes, parts), _fill(nodes, parts)):
        shares = _shares(nodes, parts, bounds)
        if _fits(nodes, shares):
            return shares
    raise _refusal(nodes, parts, model)


def plan_auto(local: Node, peers: list[Node], parts: ModelParts, model: str = "the model") -> list[Share]:
    """The fewest nodes that hold the model: this node first (it takes the request, embeds and
    samples), then the peers with the most free memory."""
    ranked = sorted(peers, key=lambda p: (-p.free, p.name))
    last_error: PlanRefused | None = None
    for count in range(1, len(ranked) + 1):
        try:
            return plan([local, *ranked[:count]], parts, model)
        except PlanRefused as e:
            last_error = e
    if last_error is None:
        raise PlanRefused(f"{model} needs {fmt_bytes(parts.total)} ({parts.total} bytes) but only "
                          f"{fmt_bytes(local.free)} is free on {local.name} and no trusted peer "
                          "answers to share it", parts.total, local.free)
    raise _refusal([local, *ranked], parts, model)


def _refusal(nodes: list[Node], parts: ModelParts, model: str) -> PlanRefused:
    k = len(nodes)
    need = parts.split_total(k)
    free = sum(x.free for x in nodes)
    each = ", ".join(f"{x.name} {fmt_bytes(x.free)}" for x in nodes)
    return PlanRefused(
        f"{model} needs {fmt_bytes(need)} ({need} bytes) split over {k} node(s) "
        f"({fmt_bytes(sum(parts.layers))} of layers with their KV cache, {fmt_bytes(parts.overhead)} "
        f"per runner), but only {fmt_bytes(free)} ({free} bytes) is free: {each}", need, free)
