"""Bonjour/mDNS discovery: advertise this hippod as `_hippo._tcp.local.` and browse for others.

Which addresses mDNS uses (the rule, in order):
  1. discovery off (HIPPO_DISCOVERY=false)           -> nothing is sent or heard.
  2. HIPPO_DISCOVERY_INTERFACES set (names or IPs)   -> the IPv4 addresses of exactly those.
  3. hippod bound to one address (HIPPO_HOST=IP)     -> the IPv4 addresses of that address's
                                                        interface: peers must reach the API there.
  4. hippod bound to a wildcard (0.0.0.0, ::)        -> the IPv4 addresses of the interface that
                                                        holds the default route, nothing else.
  5. hippod bound to loopback (the default)          -> discovery stays off: a node nobody can
                                                        reach has nothing to announce.
mDNS never runs on every interface of the machine, and never on loopback.
An announcement is unauthenticated and may name any address; hippod would then send signed hellos
there. So only the addresses of an announcement that lie on the subnets of the discovery
addresses are kept (an announcement with none left is ignored).
Only the asyncio API of python-zeroconf is used, so the daemon's loop does the work.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger("hippo.discovery")

SERVICE_TYPE = "_hippo._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Announcement:
    """What a peer says about itself in its TXT record (unauthenticated: a hint, not a fact)."""

    node_id: str
    name: str
    version: str
    addresses: tuple[str, ...]
    port: int
    memory_total: int = 0
    memory_free: int = 0
    chip: str | None = None
    backend: str | None = None


def _ipv4_of_interface(name: str) -> list[str]:
    return [a.address for a in psutil.net_if_addrs().get(name, []) if a.family == socket.AF_INET]


def _interface_holding(address: str) -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return name
    return None


def _default_route_address() -> str | None:
    """The source address the kernel would use for off-link traffic. A UDP connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing decision matters
            return s.getsockname()[0]
        except OSError:
            return None


def subnets_of(addresses: list[str]) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this machine's interfaces that hold `addresses` (a /32 for an address
    no interface reports a netmask for)."""
    nets = {}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.address in addresses and a.netmask:
                nets[a.address] = ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False)
    return [nets.get(a) or ipaddress.ip_network(f"{a}/32") for a in addresses]


def on_subnets(address: str, subnets: list[ipaddress.IPv4Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and any(ip in net for net in subnets)


def _usable(addresses: list[str]) -> list[str]:
    out = []
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if ip.version == 4 and not ip.is_loopback and not ip.is_unspecified and a not in out:
            out.append(a)
    return out


def discovery_addresses(enabled: bool, interfaces: tuple[str, ...], host: str) -> tuple[list[str], str]:
    """(IPv4 addresses mDNS binds to, why): empty means discovery stays off. See the module doc."""
    if not enabled:
        return [], "discovery is turned off"
    if interfaces:
        found = []
        for entry in interfaces:
            try:
                ipaddress.ip_address(entry)
                found.append(entry)
            except ValueError:
                addrs = _ipv4_of_interface(entry)
                if not addrs:
                    log.warning("discovery interface %r has no IPv4 address (or does not exist)", entry)
                found += addrs
        addrs = _usable(found)
        return addrs, f"HIPPO_DISCOVERY_INTERFACES={','.join(interfaces)}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [], f"hippod listens on {host!r}, not an IP address: set HIPPO_DISCOVERY_INTERFACES"
    if ip.is_loopback:
        return [], "hippod listens on loopback only (set host to a LAN address to join a cluster)"
    if ip.is_unspecified:
        default = _default_route_address()
        iface = _interface_holding(default) if default else None
        addrs = _usable(_ipv4_of_interface(iface)) if iface else []
        return addrs, f"default-route interface {iface or '(none)'}"
    iface = _interface_holding(host)
    addrs = _usable(_ipv4_of_interface(iface) if iface else [host])
    return addrs, f"interface {iface or '?'} of {host}"


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:40] or "hippo"


class Discovery:
    """Advertises this node and reports peers as they appear (`on_seen`) and leave (`on_gone`)."""

    def __init__(self, addresses: list[str], node_id: str, name: str, port: int,
                 txt: Callable[[], dict[str, str]], on_seen: Callable[[Announcement], None],
                 on_gone: Callable[[str], None]):
        if not addresses:
            raise ValueError("discovery needs at least one address")
        self.addresses = addresses
        self.subnets = subnets_of(addresses)
        self.node_id = node_id
        self.port = port
        self._txt = txt
        self._on_seen = on_seen
        self._on_gone = on_gone
        self.instance = f"{_label(name)}-{node_id[:8]}.{SERVICE_TYPE}"
        self._server = f"hippo-{node_id[:12]}.local."  # never clashes with the Mac's own name
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._names: dict[str, str] = {}  # service name -> node id, to map removals
        self._tasks: set[asyncio.Task] = set()
        self.advertising = False  # our name is registered (mDNS probing done)

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(SERVICE_TYPE, self.instance, port=self.port, properties=self._txt(),
                                server=self._server, parsed_addresses=self.addresses)

    async def start(self) -> None:
        # Always an explicit address list: zeroconf's own default would use every interface.
        self._zc = AsyncZeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._info = self._service_info()
        started = time.monotonic()
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self.advertising = True
        log.info("discovery: advertising %s on %s (%.1fs)", self._info.name, ", ".join(self.addresses),
                 time.monotonic() - started)

    async def refresh(self) -> None:
        """Re-announce when the TXT record changed (memory moves; mDNS caches for minutes)."""
        if self._zc is None or self._info is None:
            return
        info = self._service_info()
        if info.properties != self._info.properties:
            self._info = info
            await self._zc.async_update_service(info)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()  # sends the goodbye packets
        self._zc = self._browser = None

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        log.debug("discovery: %s %s", name, state_change.name)
        if state_change is ServiceStateChange.Removed:
            node_id = self._names.pop(name, None)
            if node_id:
                self._on_gone(node_id)
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        announced = info.parsed_addresses(IPVersion.V4Only)
        addresses = [a for a in announced if on_subnets(a, self.subnets)]
        if announced and not addresses:
            log.debug("discovery: ignoring %s: it names only addresses off our subnets (%s)", name,
                      ", ".join(announced[:4]))
        ann = parse_announcement(info.decoded_properties, addresses, info.port)
        if ann is None or ann.node_id == self.node_id:
            return
        self._names[name] = ann.node_id
        self._on_seen(ann)


def parse_announcement(props: dict[str, str | None], addresses: list[str], port: int | None
                       ) -> Announcement | None:
    def number(key: str) -> int:
        try:
            return max(0, int(props.get(key) or 0))
        except ValueError:
            return 0

    node_id = props.get("id") or ""
    if not re.fullmatch(r"[0-9a-f]{32}", node_id) or not addresses:
        return None
    try:
        api_port = int(props.get("port") or port or 0)
    except ValueError:
        return None
    if not 0 < api_port < 65536:
        return None
    return Announcement(node_id=node_id, name=(props.get("name") or node_id[:8])[:64],
                        version=(props.get("ver") or "?")[:32], addresses=tuple(addresses),
                        port=api_port, memory_total=number("mem_total"), memory_free=number("mem_free"),
                        chip=props.get("chip"), backend=props.get("backend"))
