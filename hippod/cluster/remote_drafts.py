"""Drafting on a peer: a model's draft runs on a trusted peer, its target here.

`hippoctl run MODEL --draft-on NODE` pins the model's draft to NODE (`<home>/draft_on.json`,
like a split's placement); unpinned, the scheduler puts the draft on a peer only when the model
fits here without it and not with it, and a trusted peer holds the draft and the memory for it. When the model loads, this node asks the peer over the signed peer
channel to host a draft session for the draft's digest; the peer makes room through its own
memory guard (its hosted drafts count there), starts a draft server
(hippod.engine.remote_draft) bound to the address the request came in on, and answers with its
port and a session id. Both sides derive the session key from the cluster secret and the id,
so no key crosses the wire; the target's runner gets it in a 0600 file it deletes on reading.

Lifetime: the target pings every PING_INTERVAL while its runner lives and closes the session
when it ends; a peer kills a draft server unpinged for HOST_LOST_AFTER. A target told its
session is gone reloads the model at the next request, which opens a new session. Any fault (the peer is
unreachable, lacks the draft, has no room) loads the model without the draft: never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass

from hippod.cluster.splits import Placements, SplitError
from hippod.registry.registry import RegistryError
from hippod.runners import OnLost, Plan, Runner, RunnerFactory
from hippod.scheduler import RUNNER_OVERHEAD, NotEnoughMemory, SchedulerError

log = logging.getLogger("hippo.remote_drafts")

PEER_PREFIX = "/api/hippo/peer/draft/"
PING_INTERVAL = 2.0
HOST_LOST_AFTER = 10.0
START_TIMEOUT = 120.0
KEY_ENV = "HIPPO_DRAFT_KEY"  # where hippod.engine.remote_draft reads its key (the daemon imports no mlx)


class DraftHostError(SchedulerError):
    pass


def session_key(keyring, session: str) -> bytes:
    return keyring.derive(f"draft-session\0{session}")


@dataclass
class HostedDraft:
    """A draft server this node runs for a peer's target."""
    session: str
    model: str
    sender: str
    proc: asyncio.subprocess.Process
    address: str
    port: int
    bytes: int
    last_ping: float

    def row(self) -> dict:
        return {"draft_for": self.sender, "model": self.model, "address": f"{self.address}:{self.port}",
                "bytes": self.bytes, "pid": self.proc.pid, "running": self.proc.returncode is None}


class RemoteDrafts:
    def __init__(self, settings, scheduler, registry, cluster, splits):
        self.settings, self.scheduler, self.registry = settings, scheduler, registry
        self.cluster, self.splits = cluster, splits
        self.placements = Placements(settings.home / "draft_on.json")
        self.hosted: dict[str, HostedDraft] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self._watch = asyncio.ensure_future(self._watch_hosted())

    async def stop(self) -> None:
        for task in [self._watch, *self._tasks]:
            if task is not None:
                task.cancel()
        for h in list(self.hosted.values()):
            await self._drop(h, "shutdown")

    def hosted_bytes(self) -> int:
        return sum(h.bytes for h in self.hosted.values())

    # -- target side ----------------------------------------------------------------------

    def placed_on(self, model: str) -> str | None:
        """The peer `model`'s draft is pinned to, or None when it drafts here."""
        return (self.placements.get(model) or [None])[0]

    def peer_holding(self, draft: str, need: int) -> str | None:
        """A trusted, answering peer that lists `draft` and advertises `need` bytes free (the
        most free first); the session open still checks the digest and the peer's guard."""
        fits = [p for p in self.cluster.peers.usable() if draft in p.models and p.memory_free >= need]
        return max(fits, key=lambda p: (p.memory_free, p.name)).name if fits else None

    def draft_of(self, model: str):
        rec = self.registry.get(model)
        name = (rec.details or {}).get("draft")
        if not name:
            raise DraftHostError(f"model '{rec.name}' has no draft to run on a peer "
                                 "(create it with --draft first)", 400)
        draft = self.registry.get(name)
        if draft.missing:
            raise DraftHostError(f"the draft '{draft.name}' of '{rec.name}' has missing files", 400)
        return rec, draft

    async def follow(self, model: str, node: str | None) -> tuple[str, str | None]:
        """Run `model`'s draft on `node` (None, '' or 'off': here) from its next load; a loaded
        model drafting elsewhere is unloaded (once idle) so the next request follows.
        (the model's name, the peer's name or None); DraftHostError when that cannot be."""
        if node in ("", "off"):
            node = None
        if node is None and not self.placements.get(self.registry.get(model).name):
            return self.registry.get(model).name, None  # drafting here already: nothing to check
        rec, _ = self.draft_of(model)
        if node:
            peer = self.cluster.peers.find(node)
            if peer is None or not peer.trusted:
                raise DraftHostError(f"no trusted peer named '{node}' (see `hippoctl nodes`)", 404)
            node = peer.name
        if (self.placements.get(rec.name) or [None])[0] != node:
            self.placements.set(rec.name, [node] if node else None)
        loaded = self.scheduler.loaded.get(rec.name)
        if loaded is not None and (getattr(loaded.runner, "draft_placement", None) or {}).get("node") != node:
            await self.scheduler.stop(rec.name)
        return rec.name, node

    def factory(self, inner: RunnerFactory) -> RunnerFactory:
        """The scheduler's factory: a model pinned to draft on a peer gets a runner drafting there."""
        async def start(plan: Plan, on_lost: OnLost) -> Runner:
            node = plan.draft_on or self.placed_on(plan.record.name)
            if plan.split or not node:
                return await inner(plan, on_lost)
            opened = await self._open(plan, node)
            if opened is None:
                return await inner(plan, on_lost)
            peer, answer, args = opened
            try:
                runner = await inner(dataclasses.replace(plan, engine_args=plan.engine_args + tuple(args)), on_lost)
            except BaseException:
                await self._close(peer, answer["session"])
                raise
            runner.draft_placement = {"node": peer.name, "model": answer["model"],
                                      "address": f"{answer['address']}:{answer['port']}",
                                      "chosen": "auto" if plan.draft_on else "pinned"}
            self._spawn(self._keep(runner, plan.record.name, peer, answer["session"]))
            return runner
        return start

    async def _open(self, plan: Plan, node: str):
        """(peer, its answer, runner args) for a draft session on `node`; None (logged) when
        the model must load without it."""
        try:
            _, draft = self.draft_of(plan.record.name)
            peer = self.cluster.peers.find(node)
            if peer is None or not peer.trusted:
                raise DraftHostError(f"no trusted peer named {node}", 404)
            status, answer = await self.splits.call(
                peer, None, "POST", PEER_PREFIX + "open",
                {"model": draft.name, "digest": draft.digest, "context_length": plan.num_ctx},
                START_TIMEOUT)
            if status != 200:
                raise DraftHostError(answer.get("error") or f"status {status}", status)
            session = str(answer["session"])
            key_file = self.settings.run_dir / f"draft-{secrets.token_hex(8)}.key"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(session_key(self.cluster.keyring, session).hex())
            host = str(answer["address"])
            host = f"[{host}]" if ":" in host else host
            return peer, answer, ["--remote-draft", f"{host}:{int(answer['port'])}",
                                  "--remote-draft-key-file", str(key_file)]
        except (SchedulerError, SplitError, RegistryError, KeyError, ValueError, TypeError, OSError) as e:
            log.warning("%s loads without its draft on %s: %s", plan.record.name, node, e)
            return None

    async def _keep(self, runner: Runner, model: str, peer, session: str) -> None:
        """Ping the peer while the runner lives; close the session after. When the peer
        answers that the session is gone (its draft server died, or it restarted, or it gave
        the session up while unreachable), the runner is marked outdated: it cannot learn a new
        server's port and key, so the next request reloads the model (once the runner is idle),
        and that load opens a new session."""
        try:
            while not runner.exited.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(runner.exited.wait(), PING_INTERVAL)
                if runner.exited.is_set():
                    break
                try:
                    status, answer = await self.splits.call(peer, None, "POST", PEER_PREFIX + "ping",
                                                            {"session": session}, 2.0)
                except SplitError:
                    continue  # unreachable for now: the runner drafts without it meanwhile
                if status == 404 or answer.get("running") is False:
                    log.warning("the draft session of %s on %s is gone; the next load opens another",
                                model, peer.name)
                    runner.outdated = True
                    return
        finally:
            await self._close(peer, session)

    async def _close(self, peer, session: str) -> None:
        with contextlib.suppress(SplitError):
            await self.splits.call(peer, None, "POST", PEER_PREFIX + "close", {"session": session}, 2.0)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- peer side ------------------------------------------------------------------------

    async def open(self, sender: str, body: dict, local_address: str, remote: str | None = None) -> dict:
        """Host a draft server for `sender`: the model is ours (same digest), the memory guard
        makes room for it first. Raises DraftHostError with a status."""
        name, digest = body.get("model"), body.get("digest")
        ctx = body.get("context_length")
        if not isinstance(name, str) or not isinstance(digest, str) or not isinstance(ctx, int) or ctx < 1:
            raise DraftHostError("a draft session needs model, digest and context_length", 400)
        rec = self.registry.get(name)
        if rec.missing or rec.digest != digest:
            raise DraftHostError(f"this node does not hold that version of '{name}'", 404)
        need = int((rec.details or {}).get("weights_bytes") or rec.size) + RUNNER_OVERHEAD
        try:
            await self.scheduler.make_room_for_share(f"the draft '{rec.name}' for a peer", need)
        except NotEnoughMemory as e:
            raise DraftHostError(str(e), 507) from None
        session = secrets.token_hex(16)
        log_file = open(self.settings.logs_dir / "runners.log", "ab")
        try:
            proc = await self._spawn_server(rec, local_address, ctx, session, log_file, remote)
        finally:
            log_file.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            ready = json.loads(line)
            port = int(ready["port"])
        except (asyncio.TimeoutError, ValueError, KeyError, TypeError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise DraftHostError(f"the draft server for '{rec.name}' did not start", 500) from None
        self.hosted[session] = HostedDraft(session, rec.name, sender, proc, local_address, port, need,
                                           time.monotonic())
        log.info("drafting %s for %s at %s:%s", rec.name, sender, local_address, port)
        return {"session": session, "model": rec.name, "address": local_address, "port": port}

    async def _spawn_server(self, rec, local_address: str, ctx: int, session: str, log_file,
                            remote: str | None = None):
        """`remote`: the address the session was asked from; the server takes connections from
        it only (the target's runner runs on that node)."""
        allow = ["--allow", remote] if remote else []
        return await asyncio.create_subprocess_exec(
            self.settings.runner_python or sys.executable, "-m", "hippod.engine.remote_draft",
            "--model", str(self.registry.model_dir(rec)), "--bind", local_address,
            "--context-length", str(ctx), *allow,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 KEY_ENV: session_key(self.cluster.keyring, session).hex()})

    def _mine(self, sender: str, body: dict) -> HostedDraft:
        h = self.hosted.get(str(body.get("session")))
        if h is None or h.sender != sender:
            raise DraftHostError("no such draft session here", 404)
        return h

    def ping(self, sender: str, body: dict) -> dict:
        h = self._mine(sender, body)
        h.last_ping = time.monotonic()
        return {"running": h.proc.returncode is None}

    async def close(self, sender: str, body: dict) -> dict:
        await self._drop(self._mine(sender, body), "closed by its target")
        return {"closed": True}

    async def _drop(self, h: HostedDraft, why: str) -> None:
        self.hosted.pop(h.session, None)
        if h.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                h.proc.kill()
        await h.proc.wait()
        log.info("draft session for %s ended: %s", h.sender, why)

    async def _watch_hosted(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for h in list(self.hosted.values()):
                if h.proc.returncode is not None:
                    await self._drop(h, f"the draft server exited ({h.proc.returncode})")
                elif now - h.last_ping > HOST_LOST_AFTER:
                    await self._drop(h, "its target stopped pinging")
