"""`hippoctl serve` (hippod in the foreground, as `ollama serve`) and `hippoctl info` (this
machine's facts from GET /api/hippo/info)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hippoctl.client import Client
from hippoctl.tables import human_bytes, table


def serve(argv: list[str]) -> int:
    """Replace this process with hippod and the same flags: signals, exit status and the
    terminal are hippod's own, as if it had been started directly."""
    os.execv(sys.executable, [sys.executable, "-m", "hippod.daemon", *argv])
    return 0  # not reached


INFO_ARGS = (
    (("--json",), {"action": "store_true", "help": "print the daemon's answer as JSON"}),
)


def info(client: Client, args: argparse.Namespace) -> None:
    answer = client.get("/api/hippo/info")
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    print(render_info(answer))


def render_info(i: dict) -> str:
    from hippoctl.main import client_version

    mlx = i.get("mlx") or {}
    memory = i.get("memory") or {}
    if mlx.get("error"):
        device = f"unavailable ({mlx['error']})"
    else:
        device = f"{mlx.get('device', '?')} (MLX {mlx.get('mlx_version', '?')})"
    budget = f"{human_bytes(i.get('memory_budget'))} ({i.get('memory_budget_source', '')}), " \
             f"{human_bytes(i.get('memory_used')) or '0 B'} in use"
    rows = [
        ("Node", i.get("node")),
        ("Version", f"hippod {i.get('version')}, hippoctl {client_version()}"),
        ("OS", i.get("os")),
        ("Chip", f"{i.get('chip')} ({i.get('cpus')} cores)"),
        ("Memory", f"{human_bytes(memory.get('total'))} total, "
                   f"{human_bytes(memory.get('available'))} available"),
        ("Backend", i.get("backend")),
        ("MLX device", device),
        ("Memory budget", budget),
        ("Memory guard", i.get("guard")),
        ("Home", i.get("home")),
        ("Blobs", f"{human_bytes(i.get('blob_bytes')) or '0 B'} in {i.get('blobs')} file(s), "
                  f"{i.get('models')} model(s); {human_bytes(i.get('disk_free'))} free on disk"),
    ]
    return table((), rows)
