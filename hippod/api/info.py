"""GET /api/hippo/info: this machine's facts for `hippoctl info` and the chat page.

Chip, memory, backend and MLX device, the memory budget and guard, the home and what its blobs
take on disk, the version. The daemon never imports MLX: a loaded runner says which device it
computes on, else one short `python -m hippod.engine.device` subprocess does (asked once).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import sys

import psutil
from aiohttp import web

from hippod import __version__
from hippod.cluster.peers import backend_name, chip_name

routes = web.RouteTableDef()
PROBE_TIMEOUT = 60.0


async def probe_mlx(python: str) -> dict:
    """{"device", "mlx_version", ...} from a subprocess, or {"error": ...} when MLX cannot start."""
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "hippod.engine.device", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        return {"error": f"cannot start MLX: {e or 'timed out'}"}
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "the MLX probe printed no answer"}


async def mlx_facts(app: web.Application) -> dict:
    """The probe's answer (asked once), with the device a loaded runner reports, if any."""
    if "mlx_probe" not in app:
        settings = app["settings"]
        app["mlx_probe"] = await probe_mlx(settings.runner_python or sys.executable)
    for m in app["scheduler"].loaded.values():
        device = getattr(getattr(m.runner, "ready", None), "device", None)
        if device:
            return {**app["mlx_probe"], "device": device, "from": f"runner of {m.name}"}
    return {**app["mlx_probe"], "from": "probe"}


def disk_use(blobs_dir) -> dict:
    count = size = 0
    with os.scandir(blobs_dir) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False) and e.name.startswith("sha256-"):
                count += 1
                size += e.stat(follow_symlinks=False).st_size
    free = shutil.disk_usage(blobs_dir).free
    return {"blobs": count, "blob_bytes": size, "disk_free": free}


@routes.get("/api/hippo/info")
async def info(request: web.Request) -> web.Response:
    app = request.app
    settings, scheduler = app["settings"], app["scheduler"]
    memory = psutil.virtual_memory()
    disk, mlx = await asyncio.gather(asyncio.to_thread(disk_use, settings.blobs_dir), mlx_facts(app))
    return web.json_response({
        "version": __version__, "node": scheduler.node,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "chip": chip_name(), "cpus": os.cpu_count(),
        "memory": {"total": memory.total, "available": memory.available},
        "backend": backend_name(), "mlx": mlx,
        "memory_budget": scheduler.budget(), "memory_used": scheduler.used(),
        "memory_budget_source": "setting" if settings.memory_budget is not None else "automatic",
        "guard": settings.guard,
        "home": str(settings.home), "models": len(app["registry"].list()), **disk,
    })
