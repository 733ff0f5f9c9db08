"""hippod: wires settings, store, registry, scheduler and the HTTP API together, then serves.

Starts fast on purpose: nothing here imports mlx; models load in runner processes on demand.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path

from aiohttp import web

from hippod import __version__
from hippod.config import ConfigError, Settings, is_loopback, load_settings
from hippod.runner_process import kernel_cache_env

log = logging.getLogger("hippo")


def parse_args(argv: list[str] | None) -> dict:
    ap = argparse.ArgumentParser(prog="hippod", description="hippo daemon: serves local LLMs "
                                 "with the Ollama and OpenAI APIs")
    ap.add_argument("--host", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default 11434)")
    ap.add_argument("--home", help="state directory (default ~/.hippo)")
    ap.add_argument("--memory-budget", dest="memory_budget", help="bytes models may use, e.g. 12GB")
    ap.add_argument("--keep-alive", dest="keep_alive", help="default keep_alive, e.g. 5m")
    ap.add_argument("--num-parallel", dest="num_parallel", type=int, help="batch slots per model")
    ap.add_argument("--insecure", action="store_true", default=None,
                    help="allow binding a non-loopback address without an API key")
    ap.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")
    ap.add_argument("--shutdown-grace", dest="shutdown_grace", type=float,
                    help="seconds running requests may finish after SIGTERM (default 30)")
    ap.add_argument("--version", action="version", version=f"hippod {__version__}")
    return vars(ap.parse_args(argv))


def setup_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    if settings.log_console:  # a service turns this off: its stderr file would never rotate
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        root.addHandler(console)
    file = RotatingFileHandler(settings.logs_dir / "hippod.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
    file.setFormatter(fmt)
    root.addHandler(file)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


LOG_MAX_BYTES = 10 * 2**20
LOG_BACKUPS = 5


def rotate_if_large(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Rotate a log other processes append to (runners.log) as RotatingFileHandler would.

    A runner keeps writing to the renamed file until it is restarted; new runners start afresh.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))
    return True


async def rotate_logs_periodically(settings: Settings, every: float = 600.0) -> None:
    while True:
        rotate_if_large(settings.logs_dir / "runners.log")
        await asyncio.sleep(every)


async def drain(inflight, site: web.BaseSite, grace: float, hurry: asyncio.Event) -> None:
    """Stop accepting, then give running requests (streams too) up to `grace` s to finish."""
    inflight.draining = True
    await site.stop()
    if not inflight.count:
        return
    log.info("waiting up to %.0fs for %d running request(s) to finish (signal again to stop now)",
             grace, inflight.count)
    waits = [asyncio.ensure_future(inflight.wait_idle(grace)), asyncio.ensure_future(hurry.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if inflight.count:
        log.warning("%d request(s) still running: stopping their models; their streams end with an error",
                    inflight.count)


async def serve(settings: Settings, started: float) -> None:
    from hippod.api.app import build_app
    from hippod.registry.registry import Registry
    from hippod.scheduler import Scheduler
    from hippod.store.database import Store

    store = Store(settings.db_path)
    crashed = store.close_open_loads("crashed")
    if crashed:
        log.warning("%d model load(s) were left open by an earlier hippod that stopped uncleanly", crashed)
    registry = Registry(settings, store)
    registry.reconcile()
    node = settings.node_name or socket.gethostname()
    scheduler = Scheduler(settings, store, registry, node)
    app = build_app(settings, store, registry, scheduler)
    # -- cluster (issue 5): peer table, trust, discovery; started once the API listens --
    from hippod.cluster.peers import Cluster
    cluster = app["cluster"] = Cluster(settings, store, registry, scheduler, node)
    # -- end cluster --
    from hippod.cluster.splits import Splits  # pipeline split (issue 6): one model over several nodes
    splits = app["splits"] = Splits(settings, scheduler, registry, cluster)
    scheduler.placer, scheduler.factory = splits, splits.factory(scheduler.start_local)
    from hippod.cluster.remote_drafts import RemoteDrafts  # a model's draft on a peer
    drafts = app["remote_drafts"] = RemoteDrafts(settings, scheduler, registry, cluster, splits)
    scheduler.factory = drafts.factory(scheduler.factory)
    scheduler.hosts.append(drafts.hosted_bytes)
    scheduler.drafts = drafts
    # After drain() and the runners' stop, handlers left (a pull, say) get this long, then are cancelled.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"hippod: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
    log.info("hippod %s listening on http://%s:%d (home %s, started in %.0f ms)", __version__,
             settings.host, settings.port, settings.home, (time.perf_counter() - started) * 1000)
    await cluster.start()  # cluster (issue 5)
    await splits.start()  # pipeline split (issue 6)
    await drafts.start()
    from hippod import audit  # operations (issue 8): retention of the audit log, log rotation
    chores = [asyncio.ensure_future(audit.prune_periodically(store, settings.audit_retention_days)),
              asyncio.ensure_future(rotate_logs_periodically(settings))]

    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()  # a second signal: skip what is left of the grace period
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log.info("shutting down")
    await cluster.stop()  # cluster (issue 5): mDNS goodbye before the API goes away
    await drain(app["inflight"], site, settings.shutdown_grace, hurry)  # operations (issue 8)
    for chore in chores:
        chore.cancel()
    await scheduler.shutdown()
    await runner.cleanup()
    await scheduler.shutdown()  # a model a last request loaded meanwhile: no runner outlives us
    await splits.stop()  # pipeline split (issue 6): layers run for peers stop with us
    await drafts.stop()  # draft servers run for peers stop with us
    store.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        settings = load_settings(parse_args(argv))
    except ConfigError as e:
        print(f"hippod: {e}", file=sys.stderr)
        return 2
    if not is_loopback(settings.host) and not settings.api_key and not settings.insecure:
        print(f"hippod: refusing to listen on {settings.host} without an API key; set HIPPO_API_KEY "
              "or pass --insecure", file=sys.stderr)
        return 2
    settings.ensure_dirs()
    setup_logging(settings)
    for key, value in kernel_cache_env(settings.cache_root).items():  # for every runner started
        os.environ.setdefault(key, value)
    try:
        asyncio.run(serve(settings, started))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
