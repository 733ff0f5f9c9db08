"""`hippoctl search QUERY`: MLX and GGUF models on the Hugging Face hub, through huggingface_hub.

Each hit shows its size (the safetensors weights of an MLX repo; the 4-bit-ish file of a GGUF
repo, the one `create --from` would take), whether it fits this node's memory budget or, split,
the cluster's (this node plus trusted peers' free memory), and its catalog name if it has one.
A model needs about its weights plus a quarter for KV cache and runtime: an estimate, the
scheduler decides for real at load time. `--popular` lists the catalog without the network.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from hippoctl.client import Client, HippoError
from hippoctl.tables import human_bytes, human_number, table

NEED_FACTOR = 1.25
GGUF_PREFERENCE = ("q4_k_m", "q4_0", "q4_1", "q5_k_m", "q8_0")

SEARCH_ARGS = (
    (("query",), {"nargs": "?", "default": ""}),
    (("--popular",), {"action": "store_true", "help": "list the catalog's models instead"}),
    (("--limit",), {"type": int, "default": 10, "help": "most hits per format (default 10)"}),
    (("--json",), {"action": "store_true", "help": "print the results as JSON"}),
)


def search(client: Client, args: argparse.Namespace) -> int | None:
    from hippod.registry.catalog import load_catalog

    entries = load_catalog()
    if args.popular:
        return popular(entries, args)
    if not args.query.strip():
        raise HippoError("search needs a QUERY (or --popular for the catalog)")
    if not 1 <= args.limit <= 100:
        raise HippoError("--limit must be between 1 and 100")
    by_repo = {e.repo.lower(): str(e).removesuffix(":latest") for e in entries.values() if e.repo}
    hits = hub_search(args.query.strip(), args.limit)
    budget, cluster = memory_room(client)
    for h in hits:
        h["catalog"] = by_repo.get(h["repo"].lower())
        h["fits"] = fits(h.get("size"), budget, cluster)
    if args.json:
        print(json.dumps({"query": args.query, "budget": budget, "cluster": cluster, "models": hits},
                         indent=2))
        return None
    if not hits:
        print(f"no MLX or GGUF models match {args.query!r}")
        return None
    rows = [(h["repo"], h["format"], human_bytes(h.get("size")) or "?", human_number(h.get("downloads")),
             h["fits"], h["catalog"] or "") for h in hits]
    print(table(("MODEL", "FORMAT", "SIZE", "DOWNLOADS", "FITS", "CATALOG"), rows))
    return None


def popular(entries, args) -> None:
    rows = [{"name": str(e).removesuffix(":latest"), "source": e.repo or e.package.requirement,
             "draft": e.draft, "description": e.description} for e in entries.values()]
    if args.json:
        print(json.dumps({"models": rows}, indent=2))
        return
    print(table(("NAME", "SOURCE", "DESCRIPTION"),
                [(r["name"], r["source"], r["description"]) for r in rows]))


def hub_search(query: str, limit: int) -> list[dict]:
    """MLX and GGUF repos matching `query`, most downloaded first, with their sizes."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry notices are not for this user's terminal
    api = HfApi()
    try:
        found = {}
        for fmt in ("mlx", "gguf"):
            for m in api.list_models(search=query, filter=fmt, sort="downloads", limit=limit):
                found.setdefault(m.id, {"repo": m.id, "format": fmt, "downloads": m.downloads or 0})
        with ThreadPoolExecutor(max_workers=8) as pool:
            sizes = dict(zip(found, pool.map(lambda repo: repo_size(api, repo, found[repo]["format"]),
                                              found)))
    except OfflineModeIsEnabled:
        raise HippoError("cannot search the hub: hub access is disabled (HF_HUB_OFFLINE is set)") from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        text = str(e).strip().splitlines()
        raise HippoError(f"cannot search the hub at {api.endpoint}: "
                         f"{text[0] if text else type(e).__name__}") from None
    for repo, (size, file) in sizes.items():
        found[repo].update(size=size, file=file)
    return sorted(found.values(), key=lambda h: -h["downloads"])


def repo_size(api, repo: str, fmt: str) -> tuple[int | None, str | None]:
    info = api.model_info(repo, files_metadata=True)
    files = [(s.rfilename, s.size or 0) for s in info.siblings or []]
    if fmt == "mlx":
        total = sum(size for name, size in files if name.endswith(".safetensors"))
        return (total or None), None
    ggufs = [(name, size) for name, size in files if name.lower().endswith(".gguf")]
    if not ggufs:
        return None, None
    for quant in GGUF_PREFERENCE:
        for name, size in ggufs:
            if quant in name.lower():
                return size, name
    name, size = min(ggufs, key=lambda f: f[1])
    return size, name


def memory_room(client: Client) -> tuple[int | None, int | None]:
    """(this node's budget, the cluster's: budget + trusted peers' free memory); None unknown."""
    try:
        budget = client.get("/api/hippo/info").get("memory_budget")
    except HippoError:
        return None, None
    cluster = budget
    try:
        for n in client.get("/api/hippo/nodes").get("nodes") or []:
            if not n.get("self") and n.get("trusted") and not n.get("stale"):
                cluster += int(n.get("memory_free") or 0)
    except HippoError:
        pass
    return budget, cluster


def fits(size: int | None, budget: int | None, cluster: int | None) -> str:
    if size is None or budget is None:
        return "?"
    need = size * NEED_FACTOR
    if need <= budget:
        return "yes"
    if cluster is not None and cluster > budget and need <= cluster:
        return "split"
    return "no"
