"""What the scheduler loads: a *plan*, started by a factory as a *runner*.

A plan says where a model runs: one runner process on this node, or its layers split over this
node and trusted peers. The scheduler decides the plan; a factory (handed to the scheduler,
like the `newServerFn` of ollama's scheduler) starts "a runner for this plan"; the scheduler then
registers and watches it the same way whatever it is. A runner is anything that satisfies
`Runner`: hippod.runner_process.RunnerProcess for one node, hippod.cluster.splits.SplitRunner
for a split. Cancelling a generation is closing its event iterator (`aclose()`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol, runtime_checkable

from hippod.cluster.planner import Share
from hippod.protocol import EmbedRequest, EmbedResult, GenerateRequest, InfoResult, ReadyEvent
from hippod.store.records import ModelRecord


@runtime_checkable
class Runner(Protocol):
    ready: ReadyEvent | None  # what the runner said once loaded (context, device, memory)
    exited: asyncio.Event  # set once it is gone for good: stopped, killed, crashed
    exit_code: int | None
    outdated: bool  # still answers, but the next request should get a new runner
    end_reason: str  # what the loads table records when it exits on its own: "crashed", "node lost"

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def placement(self) -> list[dict] | None:
        """Node -> layers rows for /api/ps when the model is split; None on one node."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[object]:
        """TokenEvents then one DoneEvent; closing the iterator cancels the job."""

    async def embed(self, request: EmbedRequest) -> EmbedResult: ...

    async def info(self) -> InfoResult: ...

    def memory(self) -> int:
        """Bytes the runner holds on this node now (0 when it is gone)."""

    def health(self) -> str:
        """Why it stopped (its last words), for the log; 'running' while alive."""

    async def stop(self, grace: float = 2.0) -> None: ...

    async def kill(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """Where one model runs. `estimate` is what this node's memory guard counts for it."""

    record: ModelRecord
    num_ctx: int
    num_parallel: int
    estimate: int
    engine_args: tuple[str, ...] = ()  # prompt cache, draft: what this daemon's settings add
    shares: tuple[Share, ...] = ()  # a split: this node first; empty: one runner here
    addresses: tuple[tuple[str, str], ...] = ()  # a split: peer name -> where it answered
    draft_on: str | None = None  # the peer chosen to run the draft (it does not fit here)

    @property
    def split(self) -> bool:
        return len(self.shares) > 1

    @property
    def total(self) -> int:
        """Bytes over every node of the plan."""
        return sum(s.bytes for s in self.shares) if self.shares else self.estimate

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.shares]


@dataclass(frozen=True)
class Forward:
    """A request for a model this node lacks and can run neither alone nor split: a trusted
    peer that holds it (and can run it) answers instead, streaming back over the peer API."""

    peer: str  # the peer's node name
    need: int = 0  # bytes the model needs (from the peer's manifest): what a successor must have


# A runner that lost a node asks the scheduler for its successor: the scheduler re-plans the
# model without those nodes (evicting idle models here if that lets it fit) and answers with a
# started runner, which it has registered in the old one's place.
OnLost = Callable[["Runner", frozenset[str]], Awaitable["Runner"]]
RunnerFactory = Callable[[Plan, OnLost], Awaitable["Runner"]]
