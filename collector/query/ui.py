"""The collector's built-in latency page: ``GET /ui`` and its static assets.

The page is plain HTML, CSS and JavaScript shipped as package data (``ui_assets/``):
no build step, no CDN, nothing fetched from anywhere but this collector. It reads
only the collector's own read APIs -- ``POST /query`` for the latency rows and
Jaeger's ``GET /api/traces/{id}`` for a waterfall, whose spans are already moved onto
the router's clock (:func:`.jaeger.align_clocks`) -- so it shows nothing the SQL and
Jaeger APIs would not.

The page and its assets hold no data, so they are served without the bearer token
(``UI_PATHS`` is what the auth middleware leaves open); the page sends the token,
which the user types in once and the browser keeps in localStorage, on every API call.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

__all__ = ["UI_PATHS", "ui_router"]

# name → media type; the only files served, so no path from a request reaches the disk.
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

UI_PATHS: tuple[str, ...] = ("/ui", "/ui/", *(f"/ui/{name}" for name in _ASSETS))


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui_assets", name).read_bytes()


def ui_router() -> APIRouter:
    """``GET /ui`` (the page) and ``GET /ui/<asset>``. Assets are read once, at
    construction: a missing file fails the collector's start, not a page load."""
    router = APIRouter()
    assets = {name: _asset(name) for name in _ASSETS}

    # The page refers to its assets relatively, so it must be served from /ui/.
    @router.get("/ui", include_in_schema=False)
    async def ui_redirect() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=308)  # relative: works under a proxy prefix

    @router.get("/ui/", include_in_schema=False)
    async def ui_page() -> Response:
        return _response("index.html", assets)

    @router.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        if name not in assets:
            return Response(f"no such file: /ui/{name}\n", status_code=404, media_type="text/plain")
        return _response(name, assets)

    return router


def _response(name: str, assets: dict[str, bytes]) -> Response:
    # no-cache: a collector upgraded in place must not run yesterday's script.
    return Response(assets[name], media_type=_ASSETS[name], headers={"cache-control": "no-cache"})
