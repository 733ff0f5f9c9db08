"""GET /ui: the chat page, one static HTML file (ui.html) with inline script and no build step.

The page holds no data and no secret, so it is served without the API key; everything it
shows comes from the API it calls with the key the user gives it once (kept in localStorage).
A strict Content-Security-Policy keeps it to this origin, and it may not be framed.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()
PATHS = ("/ui", "/ui/")  # served without the API key (the page asks for it)
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.lru_cache(maxsize=1)
def page_text() -> str:
    return resources.files("hippod.api").joinpath("ui.html").read_text(encoding="utf-8")


@routes.get("/ui")
@routes.get("/ui/")
async def page(request: web.Request) -> web.Response:
    return web.Response(text=page_text(), content_type="text/html", headers=HEADERS)
