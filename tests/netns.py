"""The network-namespace LANs live in bench/netns.py (the benchmark copies between peers too)."""

from bench.netns import Lan, Node, in_netns, lan, raw_tcp, sh, shaped, start_in_netns

__all__ = ["Lan", "Node", "in_netns", "lan", "raw_tcp", "sh", "shaped", "start_in_netns"]
