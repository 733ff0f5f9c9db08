"""The test daemon harness lives in bench/daemon.py (benchmarks use it and must not import tests)."""

from bench.daemon import REPO_ROOT, Daemon, free_port

__all__ = ["REPO_ROOT", "Daemon", "free_port"]
