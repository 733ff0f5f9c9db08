"""The peer table and its upkeep: who is out there, is it alive, does it hold our secret.

Discovery only says a node exists (anyone can announce anything over mDNS). A peer becomes
trusted when a signed hello succeeds both ways: it accepted our signature and its answer carries
a valid signature of its own. Every peer is probed every PROBE_INTERVAL seconds; one that has not
answered for STALE_AFTER seconds is stale: listed, but never used for transfers or planning.
Peers stale for FORGET_AFTER are dropped from the table.

mDNS is unauthenticated, so what an announcement says about a trusted peer is a lead, never a
fact: a stranger can announce a trusted peer's id with its own address and another port. So a
trusted peer's record changes only on signed answers: its `addresses` are the ones a signed hello
came from or answered on (signed traffic goes nowhere else), announced ones wait in `candidates`
until a signed answer comes from them, its port and name come from its signed hellos, and an
unsigned answer neither demotes it nor reorders its addresses (a peer that lost the secret goes
stale instead). A goodbye makes it stale at once, but a peer that answered signed after a
goodbye has its goodbyes doubted for GOODBYE_DOUBT seconds: those may be forged, and its probes
alone say when it is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import re
import secrets
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import psutil

from hippod import __version__
from hippod.cluster import trust
from hippod.cluster.discovery import Announcement, Discovery, discovery_addresses
from hippod.config import Settings
from hippod.store.database import Store
from hippod.store.records import PeerRecord

log = logging.getLogger("hippo.peers")

PROBE_INTERVAL = 1.5  # seconds between hellos to each peer
PROBE_TIMEOUT = 2.0
STALE_AFTER = 6.0  # with the interval and timeout above, a dead peer is stale within 10 s
FORGET_AFTER = 3600.0
GOODBYE_GRACE = 5.0
GOODBYE_DOUBT = 600.0  # seconds a peer's goodbyes are ignored after it answered signed past one
MAX_CANDIDATES = 8  # announced addresses of a trusted peer waiting for a signed answer
TXT_REFRESH = 30.0
HELLO_PATH = "/api/hippo/peer/hello"


@dataclass
class NodeInfo:
    """What one node tells another in a hello (both ways). The peer wire message, defined once."""

    node_id: str
    name: str
    version: str
    port: int
    addresses: list[str] = field(default_factory=list)
    memory_total: int = 0
    memory_free: int = 0
    chip: str | None = None
    backend: str | None = None
    models: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: object) -> NodeInfo:
        if not isinstance(d, dict) or not isinstance(d.get("node_id"), str):
            raise ValueError("not a node description")

        def strs(key: str) -> list[str]:
            v = d.get(key) or []
            return [str(x) for x in v][:10_000] if isinstance(v, list) else []

        def num(key: str) -> int:
            v = d.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 2**63  # inf, NaN, huge: 0
            return int(v) if ok else 0

        return cls(node_id=d["node_id"], name=str(d.get("name") or "")[:64],
                   version=str(d.get("version") or "?")[:32], port=num("port"),
                   addresses=strs("addresses"), memory_total=num("memory_total"),
                   memory_free=num("memory_free"), chip=d.get("chip") if isinstance(d.get("chip"), str) else None,
                   backend=d.get("backend") if isinstance(d.get("backend"), str) else None,
                   models=strs("models"), loaded=strs("loaded"))


def load_node_id(home: Path) -> str:
    """This node's stable id (`<home>/node-id`), made once; a copied home should be given a new one."""
    path = home / "node-id"
    try:
        text = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return text
    except FileNotFoundError:
        pass
    node_id = secrets.token_hex(16)
    path.write_text(node_id + "\n")
    return node_id


def chip_name() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=2).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def backend_name() -> str:
    return "mlx-metal" if platform.system() == "Darwin" and platform.machine() == "arm64" else "mlx-cpu"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _age(rec: PeerRecord) -> float:
    return (_now() - rec.last_seen).total_seconds() if rec.last_seen else float("inf")


class PeerTable:
    """Peers in the store plus what only lives in memory (loaded models, mDNS goodbyes)."""

    def __init__(self, store: Store):
        self.store = store
        self.loaded: dict[str, list[str]] = {}
        self.backend: dict[str, str | None] = {}
        # Said goodbye over mDNS (monotonic time): stale until it announces itself again or answers
        # after GOODBYE_GRACE (a stopping daemon still answers for a moment after its goodbye).
        self.gone: dict[str, float] = {}
        self.back_after_goodbye: dict[str, float] = {}  # when it last answered signed past a goodbye
        self.candidates: dict[str, list[str]] = {}  # a trusted peer's announced, unproven addresses

    def seen(self, ann: Announcement) -> None:
        """A peer announced itself; new ones count as seen now, known ones wait for their probe.
        For a trusted peer the announcement only offers addresses to probe (see the module doc)."""
        old = self.store.get_peer(ann.node_id)
        if old is not None and old.trusted:
            leads = [a for a in ann.addresses if a not in old.addresses]
            kept = self.candidates.get(ann.node_id, [])
            self.candidates[ann.node_id] = list(dict.fromkeys([*leads, *kept]))[:MAX_CANDIDATES]
            self.gone.pop(ann.node_id, None)
            return
        addresses = list(dict.fromkeys([*(old.addresses if old else []), *ann.addresses]))
        self.store.put_peer(PeerRecord(
            node_id=ann.node_id, name=ann.name, addresses=addresses, port=ann.port,
            memory_total=ann.memory_total, memory_free=ann.memory_free, version=ann.version,
            chip=ann.chip, trusted=old.trusted if old else False, models=old.models if old else [],
            last_seen=old.last_seen if old else None))
        self.backend.setdefault(ann.node_id, ann.backend)
        self.gone.pop(ann.node_id, None)

    def heard(self, node_id: str, *, trusted: bool, info: NodeInfo | None = None,
              address: str | None = None) -> None:
        """A peer answered (or said hello); `info` only when it proved the secret. An unsigned
        answer in a trusted peer's name changes nothing: it may come from anyone."""
        old = self.store.get_peer(node_id)
        if old is None and info is None:
            return
        if old is not None and old.trusted and info is None:
            return
        if old is None:
            old = PeerRecord(node_id=node_id, name=info.name, addresses=[], port=info.port,
                             memory_total=0, memory_free=0, version=info.version)
        rec = replace(old, trusted=trusted, last_seen=_now())
        if info is not None:  # only addresses proven by a signed exchange carry signed traffic
            if not old.trusted and address:  # what it announced before is still to be proven
                self.candidates[node_id] = [a for a in old.addresses if a != address][:MAX_CANDIDATES]
            proven = old.addresses if old.trusted or not address else []
            rec = replace(rec, addresses=list(dict.fromkeys([address, *proven] if address else proven)))
            if address in self.candidates.get(node_id, []):
                self.candidates[node_id].remove(address)
            rec = replace(rec, name=info.name or rec.name, version=info.version, port=info.port or rec.port,
                          memory_total=info.memory_total, memory_free=info.memory_free,
                          chip=info.chip or rec.chip, models=info.models)
            self.loaded[node_id] = info.loaded
            self.backend[node_id] = info.backend
        else:  # an untrusted peer (a trusted one returned above): its claims are not shown
            if address:
                rec = replace(rec, addresses=list(dict.fromkeys([address, *rec.addresses])))
            rec = replace(rec, models=[])
            self.loaded.pop(node_id, None)
        self.store.put_peer(rec)
        now = time.monotonic()
        if now - self.gone.get(node_id, float("-inf")) > GOODBYE_GRACE:
            if self.gone.pop(node_id, None) is not None and info is not None:
                self.back_after_goodbye[node_id] = now

    def said_goodbye(self, node_id: str) -> None:
        """mDNS says the peer left: stale at once, unless its goodbyes are in doubt."""
        if time.monotonic() - self.back_after_goodbye.get(node_id, float("-inf")) < GOODBYE_DOUBT:
            return
        self.gone.setdefault(node_id, time.monotonic())

    def probe_addresses(self, peer: PeerRecord) -> list[str]:
        """Where to say hello: its proven addresses, then the leads announcements gave."""
        return list(dict.fromkeys([*peer.addresses, *self.candidates.get(peer.node_id, [])]))

    def is_stale(self, rec: PeerRecord) -> bool:
        return rec.node_id in self.gone or _age(rec) > STALE_AFTER

    def usable(self) -> list[PeerRecord]:
        """Peers transfers and planning may use: trusted and answering."""
        return [p for p in self.store.list_peers() if p.trusted and not self.is_stale(p)]

    def find(self, ref: str) -> PeerRecord | None:
        """A peer by node id, id prefix, or name."""
        peers = self.store.list_peers()
        for p in peers:
            if ref in (p.node_id, p.name):
                return p
        matches = [p for p in peers if len(ref) >= 4 and p.node_id.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def forget_old(self) -> list[PeerRecord]:
        """Drop peers unseen for FORGET_AFTER; the ones kept (one read of the table)."""
        kept = []
        for p in self.store.list_peers():
            if _age(p) > FORGET_AFTER:
                self.store.delete_peer(p.node_id)
                self.loaded.pop(p.node_id, None)
            else:
                kept.append(p)
        return kept


class Cluster:
    """This node in the cluster: identity, keyring, peer table, discovery and the probe loop."""

    def __init__(self, settings: Settings, store: Store, registry, scheduler, node_name: str):
        self.settings = settings
        self.registry = registry
        self.scheduler = scheduler
        self.name = node_name
        self.node_id = load_node_id(settings.home)
        self.keyring = trust.Keyring(self.node_id, trust.load_secret(settings.cluster_secret, settings.home))
        self.secret_from_config = bool(settings.cluster_secret)
        self.peers = PeerTable(store)
        self.chip = chip_name()
        self.backend = backend_name()
        self.discovery: Discovery | None = None
        self.discovery_addresses, self.discovery_reason = discovery_addresses(
            settings.discovery, settings.discovery_interfaces, settings.host)
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self.blob_locks: dict[str, asyncio.Lock] = {}  # one transfer per blob at a time

    # -- what we say about ourselves ------------------------------------------------------

    def local_info(self) -> NodeInfo:
        mem = psutil.virtual_memory()
        addresses = self.discovery_addresses or ([self.settings.host] if self.settings.host else [])
        return NodeInfo(node_id=self.node_id, name=self.name, version=__version__, port=self.settings.port,
                        addresses=addresses, memory_total=mem.total, memory_free=mem.available,
                        chip=self.chip, backend=self.backend,
                        models=sorted(m.name for m in self.registry.list() if not m.missing),
                        loaded=sorted(self.scheduler.loaded))

    def txt(self) -> dict[str, str]:
        mem = psutil.virtual_memory()
        step = 256 * 2**20  # coarse, so the record is not re-announced on every small change
        return {"id": self.node_id, "name": self.name, "ver": __version__, "port": str(self.settings.port),
                "mem_total": str(mem.total), "mem_free": str(mem.available // step * step),
                "chip": self.chip[:100], "backend": self.backend}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin probing and discovery; returns at once (mDNS name probing takes a second or more)."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT))
        if self.keyring.secret is None:
            log.info("no cluster secret: peers will be listed as untrusted "
                     "(run `hippoctl cluster init` here, then `hippoctl cluster join TOKEN` on the others)")
        self._tasks = [asyncio.ensure_future(self._probe_loop()), asyncio.ensure_future(self._txt_loop())]
        if self.discovery_addresses:
            self.discovery = Discovery(self.discovery_addresses, self.node_id, self.name, self.settings.port,
                                       self.txt, self.peers.seen, self._on_gone)
            self._tasks.append(asyncio.ensure_future(self._start_discovery(self.discovery)))
        else:
            log.info("discovery off: %s", self.discovery_reason)

    async def _start_discovery(self, discovery: Discovery) -> None:
        try:
            await discovery.start()
        except OSError as e:
            log.warning("discovery could not start on %s: %s", self.discovery_addresses, e)
            await discovery.stop()
            self.discovery = None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        if self.session is not None:
            await self.session.close()

    def _on_gone(self, node_id: str) -> None:
        self.peers.said_goodbye(node_id)

    async def _txt_loop(self) -> None:
        while True:
            await asyncio.sleep(TXT_REFRESH)
            if self.discovery is not None:
                try:
                    await self.discovery.refresh()
                except Exception as e:  # mDNS trouble must not stop the daemon
                    log.warning("discovery: could not refresh the announcement: %s", e)

    # -- probing --------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                peers = self.peers.forget_old()
                await asyncio.gather(*(self.probe(p) for p in peers))
            except Exception:
                log.exception("peer probe round failed")
            await asyncio.sleep(max(0.2, PROBE_INTERVAL - (time.monotonic() - started)))

    async def probe(self, peer: PeerRecord) -> bool:
        """Signed hello to `peer` on each known address until one answers; True if it is trusted."""
        assert self.session is not None
        body = self.local_info().to_json()
        for address in self.peers.probe_addresses(peer):
            headers = self.keyring.sign("POST", HELLO_PATH, body, peer.node_id)
            headers["Content-Type"] = "application/json"
            try:
                async with self.session.post(peer_url(address, peer.port, HELLO_PATH), data=body,
                                             headers=headers) as resp:
                    answer = await resp.read()
                    signature = resp.headers.get(trust.H_SIGNATURE)
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
            info = None
            if status == 200 and self.keyring.verify_response(headers.get(trust.H_NONCE, ""), status, answer,
                                                              signature, peer.node_id):
                try:
                    info = NodeInfo.from_dict(json.loads(answer))
                except ValueError:
                    info = None
                if info is not None and info.node_id != peer.node_id:
                    info = None
            if info is None and peer.trusted:
                continue  # not the peer, or not any more: another address may be it
            was = peer.trusted
            self.peers.heard(peer.node_id, trusted=info is not None, info=info, address=address)
            if was != (info is not None):
                log.info("peer %s (%s) is %s", peer.name, address, "trusted" if info else "untrusted")
            return info is not None
        return False

    def receive_hello(self, sender: str, info: NodeInfo, remote: str | None) -> NodeInfo:
        """A peer proved the secret and said hello: record it as trusted, answer with our own info."""
        if info.node_id != sender:
            raise trust.TrustError("hello names another node than the one that signed it")
        self.peers.heard(sender, trusted=True, info=info, address=remote)
        return self.local_info()

    def join(self, secret: str) -> None:
        """Adopt a new cluster secret now (and keep it for the next start)."""
        trust.save_secret(self.settings.home, secret)
        self.keyring.secret = secret
        for p in self.peers.store.list_peers():  # old trust was for another secret
            self.peers.store.put_peer(replace(p, trusted=False))

    def nodes(self) -> list[dict]:
        """This node and every peer, as shown by /api/hippo/nodes."""
        me = self.local_info()
        rows = [{**asdict(me), "self": True, "trusted": True, "stale": False, "last_seen": _now().isoformat(),
                 "last_seen_seconds": 0.0}]
        for p in self.peers.store.list_peers():
            rows.append({"node_id": p.node_id, "name": p.name, "version": p.version, "port": p.port,
                         "addresses": p.addresses, "memory_total": p.memory_total,
                         "memory_free": p.memory_free, "chip": p.chip,
                         "backend": self.peers.backend.get(p.node_id), "models": p.models,
                         "loaded": self.peers.loaded.get(p.node_id, []) if p.trusted else [],
                         "self": False, "trusted": p.trusted, "stale": self.peers.is_stale(p),
                         "last_seen": p.last_seen.isoformat() if p.last_seen else None,
                         "last_seen_seconds": round(_age(p), 3)})
        return rows


def peer_url(address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"
