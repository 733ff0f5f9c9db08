"""The status page a browser gets at GET /: node, memory, loaded models, peers, recent requests.

One small self-refreshing HTML page with inline CSS and no scripts, so it works from a closet
Mac mini's address in any browser. API clients asking for "/" still get "Ollama is running".
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from html import escape

from aiohttp import web

from hippod import __version__
from hippod.config import fmt_bytes

REFRESH_SECONDS = 5
RECENT = 15

CSS = """
body{font:14px/1.4 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;
color:#1d1d1f;background:#f5f5f7}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:20px 0 6px}
.sub{color:#6e6e73;margin-bottom:12px}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px;overflow:hidden}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid #e5e5ea;white-space:nowrap}
th{background:#fafafa;font-weight:600;color:#424245}
.bar{height:10px;background:#e5e5ea;border-radius:5px;width:320px;display:inline-block;vertical-align:middle}
.bar>span{display:block;height:10px;background:#0a84ff;border-radius:5px}
.empty{color:#86868b;font-style:italic}.err{color:#c9252d}
"""


def wants_html(request: web.Request) -> bool:
    """True when the Accept header ranks text/html above everything else it names explicitly."""
    best_html, best_other = 0.0, 0.0
    for item in request.headers.get("Accept", "").split(","):
        kind, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if kind.lower() in ("text/html", "application/xhtml+xml"):
            best_html = max(best_html, q)
        elif kind and kind != "*/*":
            best_other = max(best_other, q)
    return best_html > 0 and best_html >= best_other


def _table(headers: tuple[str, ...], rows: list[tuple], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _until(m) -> str:
    """When a loaded model will be unloaded, as `hippoctl ps` says it."""
    if m.pinned:
        return "forever"
    if m.refs or m.expires_at is None:
        return "busy" if m.refs else ""
    return f"in {max(0.0, (m.expires_at - datetime.now(timezone.utc)).total_seconds()):.0f}s"


def render(app: web.Application, peers: list, requests: list) -> str:
    scheduler = app["scheduler"]
    budget, used = scheduler.budget(), scheduler.used()
    pct = 0 if budget <= 0 else min(100, round(100 * used / budget))
    models = [(escape(m.name), fmt_bytes(m.size), m.runner.pid or "", m.context_length, m.refs, _until(m))
              for m in sorted(scheduler.loaded.values(), key=lambda m: m.name)]
    peer_rows = [(escape(p.name), escape(", ".join(p.addresses)), "yes" if p.trusted else "no",
                  fmt_bytes(p.memory_free) + " / " + fmt_bytes(p.memory_total), escape(p.version),
                  _ago(p.last_seen)) for p in peers]
    request_rows = [(escape(r.time.strftime("%Y-%m-%d %H:%M:%S")) if r.time else "", escape(r.client),
                     escape(r.endpoint), escape(r.model or ""), escape(r.model_source or ""),
                     r.prompt_tokens, r.completion_tokens,
                     f"{r.total_seconds:.2f}s",
                     f'<span class="err" title="{escape(r.error or "")}">{r.status}</span>'
                     if r.status >= 400 or r.error else r.status) for r in requests]
    started = app.get("started_at")
    uptime = f" · up {_ago(started).replace(' ago', '')}" if started else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hippo · {escape(str(scheduler.node))}</title><style>{CSS}</style></head><body>
<h1>hippo on {escape(str(scheduler.node))} <a href="/ui" style="font-size:14px;font-weight:normal">open the chat</a></h1>
<div class="sub">hippod {escape(__version__)}{uptime} · {datetime.now(timezone.utc).strftime("%H:%M:%S")} UTC · refreshes every {REFRESH_SECONDS}s</div>
<h2>Memory</h2>
<div><span class="bar"><span style="width:{pct}%"></span></span> {fmt_bytes(used)} of {fmt_bytes(budget)} budget ({pct}%)
 · {scheduler.pending} request(s) active</div>
<h2>Loaded models</h2>
{_table(("Model", "Memory", "PID", "Context", "Busy", "Until"), models, "no model is loaded")}
<h2>Peers</h2>
{_table(("Name", "Addresses", "Trusted", "Free / total", "Version", "Last seen"), peer_rows, "no peers found")}
<h2>Recent requests</h2>
{_table(("Time (UTC)", "Client", "Route", "Model", "Source", "In", "Out", "Total", "Status"), request_rows,
        "no requests yet")}
</body></html>
"""


async def page(request: web.Request) -> web.Response:
    store = request.app["store"]
    await request.app["audit"].flush()
    peers, requests = await asyncio.gather(asyncio.to_thread(store.list_peers),
                                           asyncio.to_thread(store.recent_requests, RECENT))
    return web.Response(text=render(request.app, peers, requests), content_type="text/html",
                        headers={"Cache-Control": "no-store"})
