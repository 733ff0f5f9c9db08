"""Private little LANs for multi-node tests: network namespaces joined by veth pairs.

Each node gets its own namespace holding only `lo` and one veth end with an address such as
10.77.0.1/24 (and a multicast route on it, for mDNS). Two nodes are joined by one veth pair;
three or more by veth pairs to a bridge that lives in a namespace of its own. Nothing is added
to the host's namespace, so no packet of these tests can reach the real network, and everything
is deleted on exit, even when the test fails. Needs root.

`in_netns(ns, fn)` runs `fn` in a thread that has joined the namespace (setns(2) affects only
the calling thread), so a test can open sockets inside a namespace without a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, *args)


@dataclass
class Node:
    ns: str  # namespace name
    ifname: str  # its veth end
    address: str  # e.g. 10.77.0.1


@dataclass
class Lan:
    nodes: list[Node]
    namespaces: list[str] = field(default_factory=list)  # all we made, bridge's included

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]


def _unique_prefix() -> str:
    return f"hp{os.getpid() % 100000}{int(time.time() * 1000) % 1000:03d}"


@contextlib.contextmanager
def lan(n: int = 2, subnet: str = "10.77.0") -> Iterator[Lan]:
    """n namespaces on one /24: node i has `<subnet>.<i+1>`."""
    if n < 2:
        raise ValueError("a LAN needs at least two nodes")
    prefix = _unique_prefix()
    made: list[str] = []
    try:
        nodes = []
        for i in range(n):
            ns = f"{prefix}-n{i}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            nodes.append(Node(ns, f"veth{i}", f"{subnet}.{i + 1}"))
        if n == 2:
            a, b = nodes
            sh("ip", "link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname,
               "netns", b.ns)
        else:
            bridge_ns = f"{prefix}-br"
            sh("ip", "netns", "add", bridge_ns)
            made.append(bridge_ns)
            sh("ip", "-n", bridge_ns, "link", "set", "lo", "up")
            sh("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            sh("ip", "-n", bridge_ns, "link", "set", "br0", "up")
            for i, node in enumerate(nodes):
                port = f"port{i}"
                sh("ip", "link", "add", node.ifname, "netns", node.ns, "type", "veth", "peer", "name", port,
                   "netns", bridge_ns)
                sh("ip", "-n", bridge_ns, "link", "set", port, "master", "br0")
                sh("ip", "-n", bridge_ns, "link", "set", port, "up")
        for node in nodes:
            sh("ip", "-n", node.ns, "addr", "add", f"{node.address}/24", "dev", node.ifname)
            sh("ip", "-n", node.ns, "link", "set", node.ifname, "up")
            sh("ip", "-n", node.ns, "route", "add", "224.0.0.0/4", "dev", node.ifname)
        yield Lan(nodes, made)
    finally:
        for ns in reversed(made):
            _kill_leftovers(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _kill_leftovers(ns: str) -> None:
    """Processes still running inside a namespace we made (a daemon a failed test left behind)."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def in_netns(ns: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) called in a fresh thread inside namespace `ns`; its result or its exception."""
    out: dict = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def start_in_netns(ns: str, fn: Callable, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Like in_netns, but returns at once: (thread, result dict with 'value' or 'error' once done)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = in_netns(ns, fn, *args, **kwargs)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@contextlib.contextmanager
def shaped(ns: str, ifname: str, rate: str) -> Iterator[None]:
    """Limit what `ifname` in `ns` sends to `rate` (e.g. "160mbit"), as a slow link would."""
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf", "rate", rate,
       "burst", "256kb", "latency", "100ms")
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "root"],
                       capture_output=True)


def raw_tcp(sender_ns: str, address: str, receiver_ns: str, path, sink=None) -> tuple[int, float]:
    """Send a file over one TCP connection from `sender_ns` (listening on `address`) to
    `receiver_ns` (sendfile -> recv, no hash): the link's own speed, for comparison. The receiver
    drops the bytes, or with `sink` (a path) writes each buffer to that file, as a copy must
    (the file is removed after). Returns (bytes, seconds at the receiver)."""
    import socket

    with socket.socket() as probe:  # a free port; inside a fresh namespace every port is
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = threading.Event()

    def serve():
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((address, port))
            srv.listen(1)
            srv.settimeout(30)
            ready.set()
            conn, _ = srv.accept()
            with conn, open(path, "rb") as f:
                conn.sendfile(f)

    sender, sent = start_in_netns(sender_ns, serve)
    if not ready.wait(10):
        raise RuntimeError("the raw TCP sender did not start")

    def receive():
        view = memoryview(bytearray(4 << 20))
        n = 0
        fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if sink else -1
        try:
            with socket.create_connection((address, port), timeout=30) as s:
                start = time.perf_counter()
                while got := s.recv_into(view):
                    if fd >= 0:
                        os.write(fd, view[:got])
                    n += got
                return n, time.perf_counter() - start
        finally:
            if fd >= 0:
                os.close(fd)
                os.unlink(sink)

    n, seconds = in_netns(receiver_ns, receive)
    sender.join(30)
    if "error" in sent:
        raise sent["error"]
    return n, seconds
