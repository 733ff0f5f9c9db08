"""The network-namespace harness lives in bench/netns.py (benchmarks use it and must not import tests)."""

from bench.netns import Lan, Node, in_netns, in_ns, lan, raw_tcp, sh, shaped, start_in_netns

__all__ = ["Lan", "Node", "in_netns", "in_ns", "lan", "raw_tcp", "sh", "shaped", "start_in_netns"]
