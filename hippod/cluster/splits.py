"""Models split across nodes (pipeline parallelism): planning, starting, watching, stopping.

The node that takes a request is the *coordinator*: its runner is rank 0 (embeddings and
sampling) and streams tokens to its daemon like any runner. The scheduler asks `Splits.plan`
for a plan when a model does not fit here (or has a forced placement): it asks trusted peers
how much memory their guards can give and plans layer ranges (cluster/planner.py). The
scheduler's factory then starts the plan (`start_runner`) over the signed peer API:

  1. prepare: each peer makes room (evicting its own idle models), copies the safetensors files
     holding its tensors from us if it lacks the model, and picks a port for the ring;
  2. start: with the hostfile of every rank, each peer starts its runner and answers when it
     is ready, while our rank-0 runner starts here (MLX's ring connects them);
  3. the answer is a `SplitRunner`, which the scheduler registers like any runner. This module
     never touches the scheduler's state; it reads its free memory and asks it for room.

Faults: the coordinator pings each peer four times a second. A peer that does not answer for
LOST_AFTER seconds (dead, or its link dropped), or a rank whose runner is gone, ends the split;
streams in flight ask the scheduler for a successor without the lost nodes and continue there
(see SplitRunner). A peer whose coordinator stops pinging kills its own runner after
HOST_LOST_AFTER seconds, so nothing is left behind on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from hippod import paths
from hippod.cluster import forward, planner, trust
from hippod.cluster.peers import peer_url
from hippod.registry.modelinfo import read_safetensors_header
from hippod.protocol import (
    EmbedRequest,
    EmbedResult,
    ForwardEmbed,
    ForwardStart,
    GenerateRequest,
    InfoResult,
    LayerRange,
    SplitPrepare,
    SplitRef,
    SplitStart,
    TokenEvent,
    resumed,
    split_body,
)
from hippod.runner_process import RunnerError, RunnerProcess
from hippod.runners import Forward, OnLost, Plan, Runner, RunnerFactory
from hippod.scheduler import (RUNNER_OVERHEAD, NotEnoughMemory, SchedulerError, fmt_bytes, kv_cache_bytes,
                              prompt_cache_bytes)
from hippod.store.records import ModelRecord, PeerRecord

log = logging.getLogger("hippo.splits")

PEER_PREFIX = "/api/hippo/peer/split/"
# A lost node costs a stream this pause (plus its successor's load), so the coordinator listens
# closely: a peer answers a ping within milliseconds on a LAN, and a false alarm costs only a
# re-plan now that streams continue.
PING_INTERVAL = 0.25
PING_TIMEOUT = 0.6
LOST_AFTER = 1.2  # seconds without an answer before the coordinator ends the split
HOST_LOST_AFTER = 3.0  # seconds without a ping before a peer kills the runner it hosts
BUDGET_TIMEOUT = 2.0
STOP_TIMEOUT = 2.0
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class SplitError(SchedulerError):
    pass


# -- what a model's parts weigh ---------------------------------------------------------------


def tensor_groups(model_dir: Path) -> dict[str, dict[str, int]]:
    """Tensor name -> bytes, grouped: 'layer:<i>', 'head' (final norm, lm_head), 'first' (the rest)."""
    groups: dict[str, dict[str, int]] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, t in read_safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            groups.setdefault(_group_of(name), {})[name] = t["data_offsets"][1] - t["data_offsets"][0]
    return groups


def _group_of(name: str) -> str:
    m = _LAYER.search(name)
    if m:
        return f"layer:{int(m.group(1))}"
    if name.startswith("lm_head") or ".lm_head." in name or re.search(r"(^|\.)model\.norm\.", name) \
            or name.startswith("norm."):
        return "head"
    return "first"


def model_parts(model_dir: Path, details: dict, num_ctx: int, num_parallel: int = 1) -> planner.ModelParts:
    """The planner's view of a model: bytes per layer (weights + KV cache for `num_ctx` in each
    of the `num_parallel` slots: a split batches like a local runner), the first and last
    node's extras."""
    groups = tensor_groups(model_dir)
    count = int(details.get("num_layers") or 0) or len([g for g in groups if g.startswith("layer:")])
    kv = kv_cache_bytes(details, num_ctx, num_parallel, layers=1)
    layers = tuple(sum(groups.get(f"layer:{i}", {}).values()) + kv for i in range(count))
    first = sum(groups.get("first", {}).values())
    head = groups.get("head", {})
    last = sum(head.values())
    if not any(n.startswith("lm_head") or ".lm_head." in n for n in head):
        last += sum(v for n, v in groups.get("first", {}).items() if "embed_tokens" in n)  # tied
    return planner.ModelParts(layers, first, last, RUNNER_OVERHEAD)


def files_for_layers(model_dir_files: list[dict], index: dict | None, start: int, end: int,
                     first: bool, last: bool) -> list[dict]:
    """The manifest entries a rank needs: everything but safetensors files none of whose tensors
    it runs (known from model.safetensors.index.json; without an index, every file)."""
    weights = [f for f in model_dir_files if f["name"].endswith(".safetensors")]
    others = [f for f in model_dir_files if not f["name"].endswith(".safetensors")]
    if not index or len(weights) <= 1:
        return others + weights
    wanted: set[str] = set()
    weight_map = index.get("weight_map") or {}
    tied = not any(_group_of(t) == "head" and "lm_head" in t for t in weight_map)
    for tensor, file in weight_map.items():
        group = _group_of(tensor)
        keep = (group.startswith("layer:") and start <= int(group[6:]) < end) \
            or (group == "first" and (first or (last and tied and "embed_tokens" in tensor))) \
            or (group == "head" and last)
        if keep:
            wanted.add(file)
    return others + [f for f in weights if f["name"] in wanted]


# -- forced placements ------------------------------------------------------------------------


class Placements:
    """Models pinned to a list of nodes (`hippoctl run MODEL --nodes A,B`), kept in
    `<home>/placements.json` so they work like per-model configuration."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
            self.nodes = {str(k): [str(n) for n in v] for k, v in data.items() if isinstance(v, list)}
        except (OSError, ValueError, AttributeError):
            self.nodes = {}

    def get(self, model: str) -> list[str] | None:
        return self.nodes.get(model)

    def set(self, model: str, nodes: list[str] | None) -> None:
        if nodes:
            self.nodes[model] = list(nodes)
        else:
            self.nodes.pop(model, None)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.nodes, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


# -- the coordinator's runner -----------------------------------------------------------------


@dataclass
class Member:
    """One peer of a split, as the coordinator knows it."""

    peer: PeerRecord
    address: str  # where we reached it (its ring address too)
    share: planner.Share
    rank: int
    last_ok: float = field(default_factory=time.monotonic)


class SplitRunner:
    """A model split over this node and peers, as one runner (hippod.runners.Runner).

    Rank 0's runner process runs here and streams tokens; the members are the peers that hold
    the other layers. Stopping or killing it stops the whole split. When a node stops answering
    or a rank's runner dies mid-stream, every stream in flight asks the scheduler for a
    successor (`on_lost`: the scheduler re-plans without the lost nodes), then replays its
    prompt plus the tokens it already sent there and goes on: the client sees a pause.
    """

    outdated = False  # a split re-plans itself when a node goes; nothing marks it for reload

    def __init__(self, splits: "Splits", split_id: str, plan: Plan, members: list[Member],
                 rank0: RunnerProcess, on_lost: OnLost):
        self.splits = splits
        self.split_id = split_id
        self.plan = plan
        self.model = plan.record.name
        self.members = members
        self.rank0 = rank0
        self.on_lost = on_lost
        self.exited = asyncio.Event()
        self.lost: str | None = None  # why the split broke
        self.lost_nodes: set[str] = set()  # nodes that stopped answering
        self._streams = 0
        self._successor: asyncio.Future | None = None
        self._stopping = False
        self._watchdog: asyncio.Task | None = None
        self._peers_stopped = False

    # -- what the scheduler reads --------------------------------------------------------

    @property
    def ready(self):
        return self.rank0.ready

    @property
    def pid(self) -> int | None:
        return self.rank0.pid

    @property
    def exit_code(self) -> int | None:
        return self.rank0.exit_code

    @property
    def alive(self) -> bool:
        return self.rank0.alive and self.lost is None and not self.exited.is_set()

    @property
    def end_reason(self) -> str:
        """An idle split whose peer stopped answering ends for that, not as a crash."""
        return "node lost" if self.lost_nodes else "crashed"

    @property
    def placement(self) -> list[dict]:
        """What /api/ps shows: node -> layers [start, end), bytes."""
        return [{"node": s.node, "rank": i, "layers": s.layers.json(), "bytes": s.bytes}
                for i, s in enumerate(self.plan.shares)]

    def memory(self) -> int:
        return self.rank0.memory()

    def health(self) -> str:
        if self.lost:
            return f"the model split across nodes stopped: {self.lost}"
        return self.rank0.health()

    # -- jobs ----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[object]:
        sent: list[int] = []  # ids of the tokens whose text the client has
        self._streams += 1
        try:
            try:
                async for event in self.rank0.generate(request):
                    if isinstance(event, TokenEvent):
                        sent.extend(event.ids or [event.token])
                    yield event
                return
            except RunnerError as e:
                if self._stopping or e.status < 500 or (self.rank0.alive and self.lost is None):
                    raise  # the scheduler stopped it, or the request itself failed
                log.warning("split %s of %s broke mid-stream (%s); re-planning", self.split_id,
                            self.model, self.lost or e)
            successor = await self._failover()
        finally:
            self._streams -= 1
        async for event in successor.generate(resumed(request, sent)):
            yield event

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self.rank0.embed(request)

    async def info(self) -> InfoResult:
        return await self.rank0.info()

    # -- losing a node -------------------------------------------------------------------

    async def _failover(self) -> Runner:
        """One successor for every stream in flight: the scheduler's answer to our loss."""
        if self._successor is None:
            self._successor = asyncio.ensure_future(self._find_successor())
        return await asyncio.shield(self._successor)

    async def _find_successor(self) -> Runner:
        try:
            if not self.lost_nodes:  # the ring broke before the watchdog saw it: ask each node now
                self.lost_nodes = await self._unanswering()
            self.lost = self.lost or "a rank's runner stopped"
            await self._end(kill=True)
            try:
                return await self.on_lost(self, frozenset(self.lost_nodes))
            except SchedulerError as e:
                raise RunnerError(f"the model split across nodes stopped ({self.lost}) and cannot "
                                  f"continue elsewhere: {e}", e.status) from None
        finally:
            self.exited.set()

    def watch(self) -> None:
        self._watchdog = asyncio.ensure_future(self._watch_split())

    async def _watch_split(self) -> None:
        """Ping each peer; end the split when one stops answering or a runner is gone."""
        rank0_exit = asyncio.ensure_future(self.rank0.exited.wait())
        try:
            while self.lost is None and not rank0_exit.done():
                answers = await asyncio.gather(*(self._ping(m) for m in self.members))
                now = time.monotonic()
                for m, ok in zip(self.members, answers):
                    if not ok and now - m.last_ok > LOST_AFTER:
                        self.lost_nodes.add(m.peer.name)
                        self.lost = self.lost or (f"peer {m.peer.name} ({m.address}) stopped answering "
                                                  f"for {now - m.last_ok:.1f}s")
                if self.lost is not None:
                    break
                await asyncio.wait({rank0_exit}, timeout=PING_INTERVAL)
            if self._stopping:
                return
            if self.lost is None and not self.lost_nodes:  # rank 0 went first: was a node lost?
                self.lost_nodes = await self._unanswering()
            log.error("split %s of %s: %s; stopping its runners", self.split_id, self.model,
                      self.lost or f"rank 0 exited ({self.rank0.exit_code})")
            await self.rank0.kill()  # the streams in flight fail over now
            await self.stop_peers()
            if self._streams == 0 and self._successor is None:
                self.exited.set()  # idle: the scheduler unloads it; the next request plans again
        finally:
            rank0_exit.cancel()
            self.splits.forget_hostfile(self.split_id)

    async def _unanswering(self) -> set[str]:
        """The members that do not answer a ping now."""
        answered = await asyncio.gather(*(self._ping(m) for m in self.members))
        return {m.peer.name for m, ok in zip(self.members, answered) if not ok}

    async def _ping(self, m: Member) -> bool:
        """True when the node answered (whatever it said)."""
        try:
            status, body = await self.splits.call(m.peer, m.address, "POST", PEER_PREFIX + "ping",
                                                  split_body(SplitRef(self.split_id)), PING_TIMEOUT)
        except SplitError:
            return False
        m.last_ok = time.monotonic()
        if not (status == 200 and body.get("alive")) and self.lost is None:
            self.lost = f"the runner on peer {m.peer.name} is gone ({body.get('error') or 'not alive'})"
        return True

    # -- stopping ------------------------------------------------------------------------

    async def stop_peers(self) -> None:
        if self._peers_stopped:
            return
        self._peers_stopped = True
        live = [m for m in self.members if m.peer.name not in self.lost_nodes]
        await asyncio.gather(*(self.splits.stop_member(self.split_id, m) for m in live))

    async def stop(self, grace: float = 2.0) -> None:
        self._stopping = True
        await self.rank0.stop(grace)
        await self._end()
        self.exited.set()

    async def kill(self) -> None:
        self._stopping = True
        await self._end(kill=True)
        self.exited.set()

    async def _end(self, kill: bool = False) -> None:
        if kill:
            await self.rank0.kill()
        if self._watchdog is not None and asyncio.current_task() is not self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
        await self.stop_peers()
        self.splits.forget_hostfile(self.split_id)


# -- what a peer runs for a coordinator -------------------------------------------------------


@dataclass(eq=False)
class Hosted:
    split: str
    model: str
    coordinator: str  # node id
    model_dir: Path
    layers: LayerRange
    rank: int
    world: int
    bytes: int
    context_length: int
    address: str
    port: int
    runner: RunnerProcess | None = None
    starting: bool = False
    pinged: bool = False  # the coordinator pings once its own runner is up too
    last_ping: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.monotonic)

    def row(self) -> dict:
        return {"split": self.split, "model": self.model, "coordinator": self.coordinator,
                "layers": self.layers.json(), "rank": self.rank, "world": self.world,
                "bytes": self.bytes, "pid": self.runner.pid if self.runner else None,
                "running": bool(self.runner and self.runner.alive)}


# -- the whole thing --------------------------------------------------------------------------


class Splits:
    def __init__(self, settings, scheduler, registry, cluster):
        self.settings = settings
        self.scheduler = scheduler
        self.registry = registry
        self.cluster = cluster
        self.placements = Placements(settings.home / "placements.json")
        self.hosted: dict[str, Hosted] = {}
        self._fetching: dict[str, asyncio.Task] = {}
        self.routes = forward.RecentRoutes()  # where requests for models we lack went lately
        self.session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self._watch = asyncio.ensure_future(self._watch_hosted())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for h in list(self.hosted.values()):
            await self._drop(h, "shutdown")
        if self.session is not None:
            await self.session.close()

    # -- hooks for the scheduler --------------------------------------------------------

    def forced(self, model: str, exclude: frozenset[str] = frozenset()) -> list[str] | None:
        """The peers a placement names for `model`, less the nodes in `exclude` (lost ones)."""
        nodes = self.placements.get(model)
        if not nodes:
            return None
        others = list(dict.fromkeys(n for n in nodes if not self._is_me(n) and not self._named(n, exclude)))
        return others or None

    def _named(self, ref: str, names: frozenset[str]) -> bool:
        if not names:
            return False
        peer = self.cluster.peers.find(ref)
        return ref in names or (peer is not None and peer.name in names)

    async def fetch(self, name: str) -> ModelRecord | None:
        """A request named a model this node lacks: copy it from a trusted peer that lists it
        (one copy for every request that waits for it). None when no peer has it."""
        task = self._fetching.get(name)
        if task is None:
            from hippod.cluster import transfer

            task = self._fetching[name] = asyncio.ensure_future(
                transfer.pull(self.cluster, name, lambda update: None))
            task.add_done_callback(lambda _: self._fetching.pop(name, None))
        rec = await asyncio.shield(task)
        if rec is not None:
            log.info("%s was not here: copied it from a trusted peer (%s) to serve a request", name, rec.source)
        return rec

    async def locate(self, name: str, num_ctx: int | None) -> ModelRecord | Forward | None:
        return await forward.locate(self, name, num_ctx)

    def forward(self, target: Forward, model: str, request: GenerateRequest, keep_alive) -> AsyncIterator[object]:
        assert self.session is not None
        return forward.relay(self, target, model, request, keep_alive)

    async def forward_embed(self, target: Forward, record: ForwardEmbed) -> tuple[ForwardStart, EmbedResult]:
        assert self.session is not None
        return await forward.embed(self, target, record)

    def hosted_bytes(self) -> int:
        return sum(h.bytes for h in self.hosted.values())

    def _is_me(self, ref: str) -> bool:
        return ref in (self.cluster.name, self.cluster.node_id, self.scheduler.node, "self") or (
            len(ref) >= 4 and self.cluster.node_id.startswith(ref))

    # -- talking to peers ---------------------------------------------------------------

    async def call(self, peer: PeerRecord, address: str | None, method: str, path: str,
                   body: dict | None, timeout: float) -> tuple[int, dict]:
        """A signed request to a peer (at `address`, or each known address in turn); the
        answer must carry the peer's signature. (status, JSON body)."""
        assert self.session is not None
        data = json.dumps(body or {}).encode()
        last_error = "no address"
        for addr in [address] if address else peer.addresses:
            headers = self.cluster.keyring.sign(method, path, data, peer.node_id)
            headers["Content-Type"] = "application/json"
            try:
                async with self.session.request(method, peer_url(addr, peer.port, path), data=data,
                                                headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    raw, status = await resp.read(), resp.status
                    signature = resp.headers.get(trust.H_SIGNATURE)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last_error = str(e) or type(e).__name__
                continue
            if not self.cluster.keyring.verify_response(headers.get(trust.H_NONCE, ""), status, raw,
                                                        signature, peer.node_id):
                raise SplitError(f"peer {peer.name} answered without a valid signature", 502)
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError:
                answer = {}
            if isinstance(answer, dict):
                answer.setdefault("_address", addr)
                return status, answer
            return status, {"_address": addr}
        raise SplitError(f"cannot reach peer {peer.name}: {last_error}", 502)

    async def stop_member(self, split_id: str, m: Member) -> None:
        with contextlib.suppress(SplitError):
            await self.call(m.peer, m.address, "POST", PEER_PREFIX + "stop",
                            split_body(SplitRef(split_id)), STOP_TIMEOUT)

    async def budget_of(self, peer: PeerRecord) -> tuple[PeerRecord, int, str, dict] | None:
        """(peer, bytes its guard can give now, the address that answered, its whole answer)."""
        try:
            status, body = await self.call(peer, None, "POST", PEER_PREFIX + "budget", {},
                                           BUDGET_TIMEOUT)
        except SplitError as e:
            log.info("peer %s cannot take layers now: %s", peer.name, e)
            return None
        if status != 200 or not isinstance(body.get("available"), int):
            log.info("peer %s answered %s to a budget question: %s", peer.name, status, body)
            return None
        return peer, body["available"], body["_address"], body

    # -- coordinator: planning and starting a split ------------------------------------

    def _candidates(self, forced: list[str] | None, exclude: frozenset[str]) -> list[PeerRecord]:
        if not forced:
            return [p for p in self.cluster.peers.usable() if p.name not in exclude]
        peers = []
        for ref in forced:
            p = self.cluster.peers.find(ref)
            if p is None:
                raise SplitError(f"placement names node {ref!r}, which is not a known peer "
                                 "(see `hippoctl nodes`)", 400)
            if not p.trusted:
                raise SplitError(f"peer {p.name} is not trusted: it does not hold this cluster's "
                                 "secret", 403)
            if self.cluster.peers.is_stale(p):
                raise SplitError(f"peer {p.name} is not answering", 503)
            peers.append(p)
        return peers

    async def plan(self, rec: ModelRecord, ctx: int, local_free: int, *,
                   forced: list[str] | None = None, refusal: NotEnoughMemory | None = None,
                   exclude: frozenset[str] = frozenset()) -> Plan:
        """Layer ranges of `rec` over this node (`local_free` bytes) and peers that answer, or
        the refusal with the numbers when they cannot hold it. Changes nothing anywhere."""
        peers = self._candidates(forced, exclude)
        if not peers:
            assert refusal is not None
            raise refusal
        answers = await asyncio.gather(*(self.budget_of(p) for p in peers))
        if forced and any(a is None for a in answers):
            missing = [p.name for p, a in zip(peers, answers) if a is None]
            raise SplitError(f"cannot split '{rec.name}': peer(s) {', '.join(missing)} did not answer", 503)
        offers = [a for a in answers if a is not None]
        if not offers and refusal is not None:
            raise NotEnoughMemory(f"{refusal}; no trusted peer could take a share", refusal.needed,
                                  refusal.available)
        parallel = self.settings.num_parallel
        parts = model_parts(self.registry.model_dir(rec), rec.details or {}, ctx, parallel)
        local = planner.Node(self.cluster.name, local_free)
        nodes = [planner.Node(p.name, free) for p, free, _, _ in offers]
        label = f"model '{rec.name}'"
        try:
            if forced:
                shares = planner.plan([local, *nodes], parts, label)
            else:
                shares = planner.plan_auto(local, nodes, parts, label)
        except planner.PlanRefused as e:
            raise NotEnoughMemory(str(e), e.needed, e.available) from None
        if len(shares) == 1:  # cannot happen after a refusal, but a forced list may name only us
            raise refusal or SplitError(f"'{rec.name}' needs no split", 400)
        addresses = tuple((p.name, addr) for p, _, addr, _ in offers if p.name in {s.node for s in shares})
        # Rank 0's prompt cache holds its own layers' KV; every other rank keeps the same entries.
        cache = prompt_cache_bytes(self.settings.prompt_cache_bytes, rec.details or {}, ctx, parallel)
        return Plan(rec, ctx, parallel, shares[0].bytes,
                    ("--prompt-cache-bytes", str(cache), "--prefill-batch", str(self.settings.prefill_batch)),
                    shares=tuple(shares), addresses=addresses)

    async def start_runner(self, plan: Plan, on_lost: OnLost) -> SplitRunner:
        """Prepare every peer's share, start all ranks together, and answer with the runner."""
        rec = plan.record
        where = dict(plan.addresses)
        members = []
        for rank, share in enumerate(plan.shares[1:], start=1):
            peer = self.cluster.peers.find(share.node)
            if peer is None:
                raise SplitError(f"peer {share.node} is no longer known", 503)
            members.append(Member(peer, where[share.node], share, rank))
        split_id = uuid.uuid4().hex[:12]
        world = len(plan.shares)
        rank0: RunnerProcess | None = None
        try:
            answers = await _all_or_nothing([self._prepare(split_id, plan, m, world) for m in members])
            me = answers[0]["seen_as"]
            hosts = [[f"{me}:{_free_port(me)}"]] + [[f"{m.address}:{a['port']}"] for m, a in zip(members, answers)]
            hostfile = self._hostfile(split_id, hosts)
            rank0 = RunnerProcess(
                self.registry.model_dir(rec), self.settings.run_dir, self.settings.logs_dir / "runners.log",
                num_parallel=plan.num_parallel, context_length=plan.num_ctx,
                python=self.settings.runner_python,
                extra_args=[*plan.engine_args, "--layers", plan.shares[0].layers.arg(), "--rank", "0",
                            "--world", str(world)],
                extra_env={"MLX_HOSTFILE": str(hostfile)})
            # Every rank blocks in the ring's connect until all are up: start them together, and
            # give up on all of them as soon as one fails.
            starts = [rank0.start(timeout=self.settings.load_timeout)]
            starts += [self._start_member(split_id, m, hosts) for m in members]
            await _all_or_nothing(starts)
        except BaseException as e:
            if rank0 is not None:
                await rank0.kill()
            await asyncio.gather(*(self.stop_member(split_id, m) for m in members))
            self.forget_hostfile(split_id)
            if isinstance(e, RunnerError):
                raise SplitError(f"could not start the split of '{rec.name}': {e}", e.status) from None
            raise
        runner = SplitRunner(self, split_id, plan, members, rank0, on_lost)
        runner.watch()
        return runner

    def factory(self, local: RunnerFactory) -> RunnerFactory:
        """The scheduler's factory: splits here, everything else by `local`."""
        async def start(plan: Plan, on_lost: OnLost) -> Runner:
            if plan.split:
                return await self.start_runner(plan, on_lost)
            return await local(plan, on_lost)
        return start

    async def _prepare(self, split_id: str, plan: Plan, m: Member, world: int) -> dict:
        rec = plan.record
        record = SplitPrepare(split_id, rec.name, rec.digest, m.share.layers, m.rank, world, m.share.bytes,
                              plan.num_ctx)
        status, answer = await self.call(m.peer, m.address, "POST", PEER_PREFIX + "prepare",
                                         split_body(record), self.settings.load_timeout)
        if status != 200:
            raise SplitError(f"peer {m.peer.name} cannot take layers {m.share.layers} of "
                             f"'{rec.name}': {answer.get('error') or status}", 507 if status == 507 else 502)
        return answer

    async def _start_member(self, split_id: str, m: Member, hosts: list) -> dict:
        status, answer = await self.call(m.peer, m.address, "POST", PEER_PREFIX + "start",
                                         split_body(SplitStart(split_id, hosts)), self.settings.load_timeout)
        if status != 200:
            raise SplitError(f"peer {m.peer.name} could not start its runner: "
                             f"{answer.get('error') or status}", 502)
        m.last_ok = time.monotonic()
        return answer

    def _hostfile(self, split_id: str, hosts: list) -> Path:
        path = self.settings.run_dir / f"split-{split_id}.json"
        path.write_text(json.dumps(hosts))
        return path

    def forget_hostfile(self, split_id: str) -> None:
        (self.settings.run_dir / f"split-{split_id}.json").unlink(missing_ok=True)

    # -- host: running layers for a peer -------------------------------------------------

    def budget(self) -> dict:
        return {"available": self.scheduler.available(), "budget": self.scheduler.budget(),
                "node": self.cluster.name, "loaded": sorted(self.scheduler.loaded)}

    async def prepare(self, sender: str, body: SplitPrepare, local_address: str, remote: str) -> dict:
        """Make room (evicting our own idle models, never pinned or busy ones), get the files,
        pick a ring port. Raises SplitError with a status."""
        split_id, name, layers, need = body.split, body.model, body.layers, body.bytes
        if split_id in self.hosted:
            raise SplitError(f"split {split_id} is already prepared here", 409)
        coordinator = self.cluster.peers.store.get_peer(sender)
        if coordinator is None:
            raise SplitError("unknown coordinator", 403)
        try:
            await self.scheduler.make_room_for_share(f"layers {layers} of '{name}' on node {self.cluster.name}",
                                                     need)
        except NotEnoughMemory as e:
            raise SplitError(str(e), 507) from None
        model_dir = await self._model_files(coordinator, body)
        hosted = Hosted(split_id, name, sender, model_dir, layers, body.rank, body.world, need,
                        body.context_length or self.settings.num_ctx, local_address, _free_port(local_address))
        self.hosted[split_id] = hosted
        log.info("prepared layers %s of %s for %s (split %s)", layers, name, coordinator.name, split_id)
        return {"port": hosted.port, "address": local_address, "seen_as": remote}

    async def _model_files(self, coordinator: PeerRecord, body: SplitPrepare) -> Path:
        """Our copy of the model if we have this version, else the files this rank needs,
        copied from the coordinator into `<home>/shards/<digest>/` (kept for next time)."""
        from hippod.cluster import transfer

        name, digest, start, end = body.model, body.digest, body.layers.start, body.layers.end
        rank, world = body.rank, body.world
        rec = self.registry.store.get_model(self.registry.normalize(name))
        if rec is not None and rec.digest == digest and not rec.missing:
            return self.registry.model_dir(rec)
        manifest = await transfer.fetch_manifest(self.cluster, coordinator, name)
        if manifest is None or manifest.get("digest") != digest:
            raise SplitError(f"peer {coordinator.name} no longer has this version of '{name}'", 409)
        files = manifest["files"]
        target = paths.confined(self.settings.home / "shards", paths.check_sha256(digest))
        target.mkdir(parents=True, exist_ok=True)
        index = None
        entry = next((f for f in files if f["name"] == "model.safetensors.index.json"), None)
        if entry is not None:
            await self._fetch(coordinator, entry, target)
            with contextlib.suppress(OSError, ValueError):
                index = json.loads((target / entry["name"]).read_text())
        needed = files_for_layers(files, index, start, end, rank == 0, rank == world - 1)
        for f in needed:
            await self._fetch(coordinator, f, target)
        log.info("copied %d of %d files of %s from %s for layers %d-%d", len(needed), len(files), name,
                 coordinator.name, start, end - 1)
        return target

    async def _fetch(self, peer: PeerRecord, f: dict, target: Path) -> None:
        from hippod.cluster import transfer

        dest = target / f["name"]
        if dest.is_file() and dest.stat().st_size == f["size"]:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = self.cluster.blob_locks.setdefault(f["sha256"], asyncio.Lock())
        async with lock:
            await asyncio.to_thread(transfer.download_blob, self.cluster, peer, f["sha256"], f["size"],
                                    dest, lambda done, total: None, threading.Event())

    async def start_hosted(self, sender: str, body: SplitStart) -> dict:
        h = self.hosted.get(body.split)
        if h is None or h.coordinator != sender:
            raise SplitError("no such split prepared here", 404)
        if h.runner is not None:
            raise SplitError("this split's runner is already started", 409)
        hosts = body.hosts
        if len(hosts) != h.world:
            raise SplitError("hosts must list one [\"address:port\"] per rank", 400)
        hostfile = self.settings.run_dir / f"split-{h.split}.json"
        hostfile.write_text(json.dumps(hosts))
        h.runner = RunnerProcess(
            h.model_dir, self.settings.run_dir, self.settings.logs_dir / "runners.log", num_parallel=1,
            context_length=h.context_length, python=self.settings.runner_python,
            extra_args=["--layers", h.layers.arg(), "--rank", str(h.rank), "--world", str(h.world)],
            extra_env={"MLX_HOSTFILE": str(hostfile)})
        h.starting = True
        try:
            ready = await h.runner.start(timeout=self.settings.load_timeout)
        except BaseException as e:
            await self._drop(h, "failed")
            if isinstance(e, RunnerError):
                raise SplitError(str(e), 500) from None
            raise
        finally:
            h.starting = False
        h.last_ping = time.monotonic()
        log.info("running layers %s of %s for split %s (pid %s)", h.layers, h.model, h.split, h.runner.pid)
        return {"pid": ready.pid, "rss_bytes": ready.rss_bytes, "load_seconds": ready.load_seconds}

    def ping(self, sender: str, split_id: str) -> dict:
        h = self.hosted.get(split_id)
        if h is None or h.coordinator != sender:
            raise SplitError("no such split here", 404)
        h.last_ping = time.monotonic()
        h.pinged = True
        return {"alive": bool(h.runner and h.runner.alive)}

    async def stop_hosted(self, sender: str, split_id: str) -> bool:
        h = self.hosted.get(split_id)
        if h is None or h.coordinator != sender:
            return False
        await self._drop(h, "stopped by its coordinator")
        return True

    async def _drop(self, h: Hosted, why: str) -> None:
        if self.hosted.get(h.split) is h:
            del self.hosted[h.split]
        if h.runner is not None:
            await h.runner.stop(grace=1.0)
        (self.settings.run_dir / f"split-{h.split}.json").unlink(missing_ok=True)
        log.info("dropped layers %s of %s (split %s): %s", h.layers, h.model, h.split, why)

    async def _watch_hosted(self) -> None:
        """Runners whose coordinator went quiet (dead, or the link dropped) are killed."""
        while True:
            await asyncio.sleep(PING_INTERVAL)
            now = time.monotonic()
            for h in list(self.hosted.values()):
                try:
                    if h.runner is None:
                        if now - h.created > self.settings.load_timeout:
                            await self._drop(h, "never started")
                    elif not h.starting and not h.runner.alive:
                        await self._drop(h, f"its runner exited ({h.runner.exit_code})")
                    elif not h.starting and now - h.last_ping > (HOST_LOST_AFTER if h.pinged
                                                                 else self.settings.load_timeout):
                        await self._drop(h, f"no word from its coordinator for {now - h.last_ping:.1f}s")
                except Exception:
                    log.exception("could not drop split %s", h.split)


async def _all_or_nothing(coros: list) -> list:
    """Results of all `coros`, or the first exception, with the others cancelled at once."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]
