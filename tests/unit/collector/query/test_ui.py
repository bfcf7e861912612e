"""The latency page's files: everything the page loads is served, open, and local."""

from __future__ import annotations

import re
from importlib import resources

from tokentrace.collector.query.ui import UI_PATHS

ASSETS = resources.files("tokentrace.collector.query").joinpath("ui_assets")


def test_the_page_loads_only_its_own_open_assets() -> None:
    html = ASSETS.joinpath("index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    local = [r for r in refs if not r.startswith("data:")]
    assert local, "the page refers to no assets: the pattern above is out of date"
    for ref in local:
        # Relative to /ui/, and open: a browser cannot send the bearer token for them.
        assert f"/ui/{ref}" in UI_PATHS, ref


def test_no_asset_reaches_outside_the_collector() -> None:
    for name in ("index.html", "app.js", "charts.js", "app.css"):
        text = ASSETS.joinpath(name).read_text()
        # The SVG namespace is an identifier, not a fetch.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text))
        urls.discard("http://www.w3.org/2000/svg")
        assert not urls, f"{name} refers to {sorted(urls)}"
