"""hippoctl's cluster commands: `nodes`, `cluster init`, `cluster join TOKEN`, `pull NAME --from NODE`.

Each is one `(client, args)` function plus its argument list in the shape of hippoctl.main's
COMMANDS rows, so registering one is one line there.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hippoctl.client import Client
from hippoctl.tables import human_bytes, human_duration, table


def _arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


# -- nodes ------------------------------------------------------------------------------------

NODES_ARGS = (_arg("--json", action="store_true", help="print the daemon's answer as JSON"),)


def nodes(client: Client, args: argparse.Namespace) -> None:
    """This node and the peers it found: address, version, memory, models, trust, last seen."""
    answer = client.get("/api/hippo/nodes")
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    print(render_nodes(answer))


def render_nodes(answer: dict) -> str:
    rows = []
    for n in answer.get("nodes") or []:
        addresses = n.get("addresses") or []
        address = f"{addresses[0]}:{n.get('port')}" if addresses else "-"
        memory = f"{human_bytes(n.get('memory_free'))} / {human_bytes(n.get('memory_total'))}"
        trusted = "self" if n.get("self") else ("yes" if n.get("trusted") else "no")
        if n.get("self"):
            seen = "-"
        else:
            seen = human_duration(n.get("last_seen_seconds") or 0) + " ago"
            if n.get("stale"):
                seen += " (stale)"
        name = n.get("name") or ""
        rows.append((f"{name} ({(n.get('node_id') or '')[:8]})", address, n.get("version") or "", memory,
                     len(n.get("models") or []), ", ".join(n.get("loaded") or []) or "-", trusted, seen))
    out = table(("NODE", "ADDRESS", "VERSION", "MEMORY FREE/TOTAL", "MODELS", "LOADED", "TRUSTED",
                 "LAST SEEN"), rows)
    discovery = answer.get("discovery") or {}
    if not discovery.get("enabled"):
        out += f"\n\ndiscovery is off: {discovery.get('reason') or 'turned off'}"
    if not (answer.get("cluster") or {}).get("secret"):
        out += "\nno cluster secret yet: run `hippoctl cluster init` (or `hippoctl cluster join TOKEN`)"
    return out


# -- cluster init / join ----------------------------------------------------------------------

CLUSTER_ARGS = (
    _arg("action", choices=("init", "join"),
         help="init: make the cluster secret here (if none) and print its join token; "
              "join: take the secret from a token printed by `cluster init` on another node"),
    _arg("token", nargs="?", help="the join token (for join)"),
)


def cluster(client: Client, args: argparse.Namespace) -> int | None:
    if args.action == "init":
        answer = client.post("/api/hippo/cluster/init", {})
        verb = "created" if answer.get("created") else "already has"
        print(f"{answer.get('node')} {verb} cluster {answer.get('fingerprint')}. "
              "On each other Mac, run:", file=sys.stderr)
        print(f"hippoctl cluster join {answer['token']}")
        print("Keep this token private: it admits a machine to the cluster.", file=sys.stderr)
        return None
    if not args.token:
        print("Error: cluster join needs the token printed by `hippoctl cluster init`", file=sys.stderr)
        return 2
    answer = client.post("/api/hippo/cluster/join", {"token": args.token})
    print(f"{answer.get('node')} joined cluster {answer.get('fingerprint')}")
    return None


# -- pull (peers first, or --from one) ----------------------------------------------------------

PULL_ARGS = (
    _arg("model"),
    _arg("--from", dest="from_node", metavar="NODE",
         help="copy from this peer only (node name or id, see `hippoctl nodes`)"),
)


def pull(client: Client, args: argparse.Namespace) -> None:
    """Copy the model from a trusted peer on the LAN if one has it, else download it."""
    from hippoctl.main import follow_progress  # not at the top: hippoctl.main imports this module

    body: dict[str, Any] = {"model": args.model}
    if getattr(args, "from_node", None):
        body["from"] = args.from_node
    follow_progress(client.stream("/api/hippo/pull", body))
