"""The cluster as this node's user sees it: GET /api/hippo/nodes, the cluster secret
(init / join), and a pull that copies from trusted peers before going to the hub.

init and join hand out or replace the cluster secret, so they answer only clients on this
machine (loopback, or the address the request arrived on): the secret never crosses the LAN.
"""

from __future__ import annotations

import threading

from aiohttp import web

from hippod.api.auth import from_this_machine
from hippod.api.errors import BadRequest, read_json, running
from hippod.api.fields import get
from hippod.api.ollama import _progress_stream
from hippod.cluster import transfer, trust

routes = web.RouteTableDef()


def _cluster(request: web.Request):
    return running(request, "cluster", "the cluster")


def _local_only(request: web.Request) -> None:
    """The secret is handled by hippoctl on the node itself. A browser sends Origin with every
    cross-origin call, and a page on localhost may pass the CORS check (Ollama's default
    origins), so a call with an Origin is refused too: no web page may read the join token."""
    if not from_this_machine(request):
        raise BadRequest("the cluster secret is managed only from the node's own machine", status=403)
    if request.headers.get("Origin"):
        raise BadRequest("the cluster secret is managed with hippoctl, not from a web page", status=403)


@routes.get("/api/hippo/nodes")
async def nodes(request: web.Request) -> web.Response:
    cluster = _cluster(request)
    return web.json_response({
        "node_id": cluster.node_id,
        "cluster": {"secret": cluster.keyring.secret is not None, "fingerprint": cluster.keyring.fingerprint},
        "discovery": {"enabled": cluster.discovery is not None,
                      "advertising": bool(cluster.discovery and cluster.discovery.advertising),
                      "addresses": cluster.discovery_addresses,
                      "reason": cluster.discovery_reason},
        "nodes": cluster.nodes()})


@routes.post("/api/hippo/cluster/init")
async def cluster_init(request: web.Request) -> web.Response:
    """Make this node's cluster secret if it has none; answer the join token either way."""
    _local_only(request)
    cluster = _cluster(request)
    created = cluster.keyring.secret is None
    if created:
        cluster.join(trust.new_secret())
    return web.json_response({"token": trust.make_token(cluster.keyring.secret), "created": created,
                              "fingerprint": cluster.keyring.fingerprint, "node": cluster.name})


@routes.post("/api/hippo/cluster/join")
async def cluster_join(request: web.Request) -> web.Response:
    _local_only(request)
    cluster = _cluster(request)
    token = get(await read_json(request), "token", str, required=True)
    try:
        secret = trust.parse_token(token)
    except trust.TrustError as e:
        raise BadRequest(str(e), param="token") from None
    if cluster.secret_from_config:
        raise BadRequest("this node's cluster secret is set in its configuration (cluster_secret / "
                         "HIPPO_CLUSTER_SECRET); change it there", status=409)
    cluster.join(secret)
    return web.json_response({"fingerprint": cluster.keyring.fingerprint, "node": cluster.name})


@routes.post("/api/hippo/pull")
async def pull(request: web.Request) -> web.StreamResponse:
    """Like /api/pull, but from a trusted peer first (or only from `from`), then the hub."""
    body = await read_json(request)
    name = get(body, "model", str) or get(body, "name", str, required=True)
    from_node = get(body, "from", str)
    stream = get(body, "stream", bool, True)
    cluster = _cluster(request)
    registry = request.app["registry"]
    registry.normalize(name)
    cancel = threading.Event()

    async def work(progress):
        try:
            rec = await transfer.pull(cluster, name, progress, from_node=from_node, cancel=cancel)
            if rec is None:
                await registry.pull(name, progress, cancel=cancel)
        finally:
            cancel.set()

    return await _progress_stream(request, stream, work)
