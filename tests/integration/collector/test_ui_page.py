"""The collector's latency page (``GET /ui``) in headless Chromium, against a real stack.

One stack per module -- collector, router, one prefill and two decode workers as real
processes, the collector requiring a bearer token and the prefill node's clock 30 ms
off -- serves a short load; then Debian's ``chromium`` (driven by Playwright, no
browser download) opens the page. Every chart's marks carry the numbers they draw as
data attributes; the tests compare those with what the SQL returns through ``/query``,
and the waterfall's spans with the trace's rows moved onto the router's clock by the
collector's own :func:`tokentrace.collector.query.waterfall.align`.

With ``TOKENTRACE_UI_SCREENSHOTS=docs/ui`` the tests also save a screenshot of each view
there (the README's pictures); otherwise they go to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tokentrace.collector.query.waterfall import TRACE_SQL, TraceSpan, align
from tokentrace.runtime.auth import auth_headers
from tokentrace.serving.load import run_load
from tokentrace.serving.stack import LocalStack

pytestmark = pytest.mark.timeout(300)

TOKEN = "ui-test-token"
REQUESTS = 12
OUTPUT_LEN = 12
PREFILL_SKEW_MS = -30.0
TOKEN_KEY = "tokentrace.token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The stack, loaded and with every request's rows and spans stored."""
    with pytest.MonkeyPatch.context() as mp:
        # Read by the collector (it then requires the token) and by every client here.
        mp.setenv("TOKENTRACE_AUTH_TOKEN", TOKEN)
        s = LocalStack(
            tmp_path_factory.mktemp("ui"),
            prefill_workers=1,
            decode_workers=2,
            node_env={"prefill-0": {"TOKENTRACE_CLOCK_SKEW_MS": str(PREFILL_SKEW_MS)}},
        )
        s.start()
        try:
            result = asyncio.run(
                run_load(s.router_url, REQUESTS, 2, 120, OUTPUT_LEN, progress=False)
            )
            assert all(r.success for r in result.records), [r.error for r in result.records]
            s.wait_for_rows("SELECT count() FROM tokentrace.requests", REQUESTS)
            s.wait_for_rows(
                "SELECT sum(tokens) FROM tokentrace.token_latencies", REQUESTS * OUTPUT_LEN
            )
            s.wait_for_rows("SELECT count() FROM tokentrace.kv_transfers", REQUESTS)
            for name in ("llm.request", "llm.prefill", "llm.decode"):
                s.wait_for_rows(
                    f"SELECT count() FROM tokentrace.otel_traces WHERE SpanName = '{name}'",
                    REQUESTS,
                )
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "Debian's chromium is not installed (make test installs it: apt-get install chromium)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("TOKENTRACE_UI_SCREENSHOTS")
    path = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Opened:
    """A page with the token already in its localStorage, and what it logged."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"{message.type}: {message.text} ({message.location})")

    def loads(self) -> int:
        return int(self.page.evaluate("document.body.dataset.loads || '0'"))

    def wait_ready(self, after: int = 0) -> None:
        """Until the page's load number ``after + 1`` (or later) ended; fails unless it
        ended well."""
        self.page.wait_for_function(
            f"Number(document.body.dataset.loads || 0) > {after} "
            "&& document.body.dataset.ready !== 'false'",
            timeout=60_000,
        )
        status = self.page.locator("#status").text_content()
        assert self.page.evaluate("document.body.dataset.ready") == "true", status


@pytest.fixture
def opened(stack: LocalStack, browser: Browser) -> Iterator[Opened]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.add_init_script(f"localStorage.setItem({TOKEN_KEY!r}, {TOKEN!r})")
    page = context.new_page()
    o = Opened(page)
    page.goto(f"{stack.collector_http}/ui/")
    o.wait_ready()
    try:
        yield o
    finally:
        context.close()


def _attrs(page: Page, selector: str, *names: str) -> list[dict[str, str]]:
    return list(
        page.eval_on_selector_all(
            selector,
            "(els, names) => els.map("
            "e => Object.fromEntries(names.map(n => [n, e.getAttribute(n)])))",
            list(names),
        )
    )


def _window(page: Page, chart: str) -> tuple[int, int, int]:
    svg = page.locator(f"#{chart} svg")
    return (
        int(svg.get_attribute("data-from-ms") or ""),
        int(svg.get_attribute("data-to-ms") or ""),
        int(svg.get_attribute("data-bucket-ms") or ""),
    )


def _where(from_ms: int, to_ms: int) -> str:
    return f"ts >= fromUnixTimestamp64Milli({from_ms}) AND ts < fromUnixTimestamp64Milli({to_ms})"


def test_page_loads_without_console_errors(opened: Opened, shots: Path) -> None:
    page = opened.page
    for chart in ("ttft-chart", "itl-chart", "heatmap-chart", "kv-chart"):
        assert page.locator(f"#{chart} svg").count() == 1, chart
        assert page.locator(f"#{chart} svg[data-empty]").count() == 0, f"{chart} is empty"
    assert page.locator("tr.slow-request").count() > 0
    assert page.locator("tr.prefill-steps").count() == 2
    assert opened.errors == []
    # The load took seconds: the last minute in one-second buckets shows its shape.
    before = opened.loads()
    page.select_option("#range", label="last minute")
    opened.wait_ready(after=before)
    page.screenshot(path=shots / "overview.png", full_page=True)
    for view, name in (
        ("#ttft-view", "ttft"),
        ("#itl-view", "itl"),
        ("#heatmap-view", "itl-heatmap"),
        ("#kv-view", "kv-bandwidth"),
        ("#prefill-view", "prefill-steps"),
        ("#reports-view", "reports"),
        ("#slowest-view", "slowest"),
    ):
        page.locator(view).screenshot(path=shots / f"{name}.png")


def test_page_is_open_but_its_data_needs_the_token(stack: LocalStack) -> None:
    for path in ("/ui/", "/ui/app.js", "/ui/charts.js", "/ui/app.css"):
        assert httpx.get(f"{stack.collector_http}{path}").status_code == 200, path
    moved = httpx.get(f"{stack.collector_http}/ui")
    assert moved.status_code == 308 and moved.headers["location"] == "ui/"
    # Only the page's own files are open; anything else under /ui/ is not served.
    assert httpx.get(f"{stack.collector_http}/ui/nothing.js").status_code == 401
    missing = httpx.get(f"{stack.collector_http}/ui/nothing.js", headers=auth_headers())
    assert missing.status_code == 404
    refused = httpx.post(f"{stack.collector_http}/query", json={"sql": "SELECT 1"})
    assert refused.status_code == 401


def test_asks_for_the_token_once_and_keeps_it(stack: LocalStack, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{stack.collector_http}/ui/")
        page.locator("#token-form").wait_for(state="visible")
        assert page.evaluate("document.body.dataset.ready") == "false"
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        # Listening only now: the browser logs the 401 that made the page ask.
        o = Opened(page)
        o.wait_ready()
        assert page.locator("tr.slow-request").count() > 0
        page.reload()
        o.wait_ready()  # without asking again
        assert page.locator("#token-form").is_hidden()
        assert page.evaluate(f"localStorage.getItem({TOKEN_KEY!r})") == TOKEN
        assert o.errors == []
    finally:
        context.close()


def test_percentile_charts_hold_what_the_sql_returns(stack: LocalStack, opened: Opened) -> None:
    page = opened.page
    for chart, quantile in (("p99", 0.99), ("p50", 0.5)):
        before = opened.loads()
        page.select_option("#quantile", label=chart)
        opened.wait_ready(after=before)
        assert page.locator("#ttft-chart").get_attribute("data-quantile") == chart
        from_ms, to_ms, bucket_ms = _window(page, "ttft-chart")
        bucket = f"intDiv(toUnixTimestamp64Milli(ts), {bucket_ms}) * {bucket_ms}"
        ttft = stack.query(
            f"SELECT prefill_node AS node, {bucket} AS t, "
            f"quantileExactInclusive({quantile})(ttft_s) AS v FROM tokentrace.requests "
            f"WHERE {_where(from_ms, to_ms)} AND ttft_s IS NOT NULL "
            "GROUP BY node, t"
        )
        itl = stack.query(
            f"SELECT node, {bucket} AS t, quantileExactInclusive({quantile})(itl_s) AS v "
            f"FROM tokentrace.token_latencies WHERE {_where(from_ms, to_ms)} "
            "AND itl_s IS NOT NULL GROUP BY node, t"
        )
        for name, rows in (("ttft-chart", ttft), ("itl-chart", itl)):
            drawn = _attrs(page, f"#{name} circle.point", "data-series", "data-t-ms", "data-value")
            got = {(d["data-series"], int(d["data-t-ms"])): float(d["data-value"]) for d in drawn}
            want = {(r["node"], int(r["t"])): r["v"] for r in rows}
            assert got.keys() == want.keys(), name
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-12), (name, key)
        itl_nodes = {node for node, _ in {(r["node"], r["t"]) for r in itl}}
        assert itl_nodes == {"decode-0", "decode-1"}  # both decode nodes drawn


def test_heatmap_and_kv_bandwidth_hold_what_the_sql_returns(
    stack: LocalStack, opened: Opened
) -> None:
    page = opened.page
    from_ms, to_ms, bucket_ms = _window(page, "heatmap-chart")
    cells = _attrs(
        page, "#heatmap-chart rect.cell", "data-node", "data-t-ms", "data-bin", "data-count"
    )
    got = {
        (c["data-node"], int(c["data-t-ms"]), int(c["data-bin"])): int(c["data-count"])
        for c in cells
    }
    rows = stack.query(
        f"SELECT node, intDiv(toUnixTimestamp64Milli(ts), {bucket_ms}) * {bucket_ms} AS t, "
        "toInt32(floor(log10(itl_s) * 5)) AS bin, count() AS n FROM tokentrace.token_latencies "
        f"WHERE {_where(from_ms, to_ms)} AND itl_s > 0 GROUP BY node, t, bin"
    )
    assert got == {(r["node"], int(r["t"]), int(r["bin"])): int(r["n"]) for r in rows}
    # Every gap of the load is in some cell: each emission but a request's first.
    (gaps,) = stack.query(
        "SELECT count() - uniqExact(trace_id) AS n FROM tokentrace.token_latencies "
        f"WHERE {_where(from_ms, to_ms)}"
    )
    assert sum(got.values()) == gaps["n"] > 0
    bars = _attrs(
        page,
        "#kv-chart rect.bar",
        "data-src",
        "data-dst",
        "data-transfers",
        "data-bytes",
        "data-value",
    )
    kv = stack.query(
        "SELECT src_node, dst_node, count() AS n, sum(bytes) AS b, sum(duration_s) AS s "
        f"FROM tokentrace.kv_transfers WHERE {_where(from_ms, to_ms)} AND duration_s > 0 "
        "GROUP BY src_node, dst_node"
    )
    assert {(b["data-src"], b["data-dst"]) for b in bars} == {
        ("prefill-0", "decode-0"),
        ("prefill-0", "decode-1"),
    }
    by_pair = {(r["src_node"], r["dst_node"]): r for r in kv}
    assert sum(int(b["data-transfers"]) for b in bars) == REQUESTS
    for b in bars:
        want = by_pair[(b["data-src"], b["data-dst"])]
        assert int(b["data-transfers"]) == want["n"]
        assert int(b["data-bytes"]) == want["b"]
        assert float(b["data-value"]) == pytest.approx(want["b"] / want["s"], rel=1e-9)


def test_prefill_steps_table_holds_what_the_sql_returns(stack: LocalStack, opened: Opened) -> None:
    page = opened.page
    from_ms, to_ms, _ = _window(page, "itl-chart")
    rows = _attrs(
        page,
        "#prefill-table tr.prefill-steps",
        "data-node",
        "data-gaps",
        "data-with-prefill",
        "data-p99-with",
        "data-p99-without",
    )
    want = stack.query(
        "SELECT node, count() AS gaps, countIf(step_prefill_tokens > 0) AS with_prefill, "
        "quantileExactInclusiveIf(0.99)(itl_s, step_prefill_tokens = 0) AS p99_without "
        f"FROM tokentrace.token_latencies WHERE {_where(from_ms, to_ms)} "
        "AND itl_s IS NOT NULL AND step_prefill_tokens IS NOT NULL GROUP BY node ORDER BY node"
    )
    assert [r["data-node"] for r in rows] == ["decode-0", "decode-1"]
    for got, row in zip(rows, want, strict=True):
        assert int(got["data-gaps"]) == row["gaps"] > 0
        # A disaggregated decode worker's steps never carry a prompt's prefill.
        assert int(got["data-with-prefill"]) == row["with_prefill"] == 0
        assert got["data-p99-with"] == ""
        assert float(got["data-p99-without"]) == pytest.approx(row["p99_without"], rel=1e-12)


def _slowest(stack: LocalStack, page: Page) -> list[dict[str, Any]]:
    from_ms, to_ms, _ = _window(page, "ttft-chart")
    return stack.query(
        f"SELECT trace_id, e2e_s FROM tokentrace.requests WHERE {_where(from_ms, to_ms)} "
        "AND e2e_s IS NOT NULL ORDER BY e2e_s DESC, trace_id LIMIT 20"
    )


def test_clicking_a_slow_request_opens_its_waterfall(
    stack: LocalStack, opened: Opened, shots: Path
) -> None:
    page = opened.page
    listed = _attrs(page, "tr.slow-request", "data-trace-id")
    slowest = _slowest(stack, page)
    assert [r["data-trace-id"] for r in listed] == [r["trace_id"] for r in slowest]
    trace_id = slowest[0]["trace_id"]

    before = opened.loads()
    page.click(f"tr.slow-request[data-trace-id='{trace_id}'] a.trace-link")
    page.wait_for_url(f"**/ui/#trace={trace_id}")
    opened.wait_ready(after=before)
    assert page.locator("#trace").is_visible() and page.locator("#overview").is_hidden()
    assert page.locator("#waterfall-chart svg").get_attribute("data-trace-id") == trace_id

    rows = stack.query(TRACE_SQL.format(trace_id=trace_id))
    expected = {s.span_id: s for s in align([TraceSpan.from_row(r) for r in rows])}
    drawn = _attrs(
        page,
        "#waterfall-chart rect.span",
        "data-span-id",
        "data-span-name",
        "data-node",
        "data-start-us",
        "data-duration-us",
        "data-clock-adjustment-us",
    )
    assert {d["data-span-id"] for d in drawn} == set(expected)
    assert len(drawn) == len(expected)
    for d in drawn:
        span = expected[d["data-span-id"]]
        assert (d["data-span-name"], d["data-node"]) == (span.name, span.node)
        assert int(d["data-start-us"]) == span.start_ns // 1000
        assert int(d["data-duration-us"]) == span.duration_ns // 1000
    names = {d["data-span-name"] for d in drawn}
    assert {"llm.request", "llm.prefill", "llm.kv_transfer", "llm.decode", "llm.token"} <= names
    tokens = [d for d in drawn if d["data-span-name"] == "llm.token"]
    assert len(tokens) == OUTPUT_LEN
    # The prefill node's clock is 30 ms off: its spans were moved, and say by how much.
    moved = [d for d in drawn if d["data-node"] == "prefill-0"]
    assert moved and all(d["data-clock-adjustment-us"] for d in moved)
    # Lanes in the order a request travels.
    lanes = page.eval_on_selector_all(
        "#waterfall-chart g.lane", "els => els.map(e => e.dataset.node)"
    )
    assert lanes[0] == "router-0" and lanes[1] == "prefill-0"
    assert lanes[2].startswith("decode-") and len(lanes) == 3
    assert opened.errors == []
    page.locator("#waterfall-view").screenshot(path=shots / "waterfall.png")

    before = opened.loads()
    page.click("#waterfall-view a[href='#']")
    opened.wait_ready(after=before)
    assert page.locator("#overview").is_visible()


def test_ui_command_prints_the_page_url(stack: LocalStack, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokentrace", "ui", "--data-dir", str(stack.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url == f"{stack.collector_http}/ui/"
    page = httpx.get(url)
    assert page.status_code == 200 and "<title>tokentrace" in page.text


def test_ui_command_serves_the_page_from_a_store_no_collector_runs_on(tmp_path: Path) -> None:
    """After the collector has stopped, ``tokentrace ui`` serves the page and the
    read-only APIs it reads from the store itself, and nothing that writes."""
    from collector_process import running_collector
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    now = time.time_ns()
    span = Span(
        trace_id=bytes(range(1, 17)),
        span_id=bytes(range(1, 9)),
        name="stored-before",
        start_time_unix_nano=now,
        end_time_unix_nano=now + 1000,
    )
    export = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    headers = auth_headers()  # this module's collectors require a token
    with running_collector(tmp_path) as collector:
        sent = httpx.post(
            collector.otlp_http,
            content=export.SerializeToString(),
            headers={"content-type": "application/x-protobuf", **headers},
        )
        assert sent.status_code == 200
    ui = subprocess.Popen(
        [sys.executable, "-m", "tokentrace", "ui", "--data-dir", str(tmp_path)]
        + ["--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ui.stdout is not None
        url = ui.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/ui/"), url
        base = url.removesuffix("/ui/")
        page = httpx.get(url)
        assert page.status_code == 200 and "<title>tokentrace" in page.text
        query = {"sql": "SELECT SpanName FROM otel_traces"}
        if headers:  # the token is required as the collector required it
            assert httpx.post(f"{base}/query", json=query).status_code == 401
        rows = httpx.post(f"{base}/query", json=query, headers=headers).json()["rows"]
        assert rows == [["stored-before"]]
        trace = httpx.get(f"{base}/api/traces/{bytes(range(1, 17)).hex()}", headers=headers)
        assert trace.status_code == 200
        nothing = httpx.post(f"{base}/v1/traces", content=b"", headers=headers)
        assert nothing.status_code in (404, 405)  # no receivers: it cannot store anything
    finally:
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=30) == 0


ROOT = Path(__file__).resolve().parents[3]
SAME_NUMBERS = {"ttft_by_router": "ttft_p99_s", "itl_by_decode": "itl_p99_s"}


def _grafana_sql(name: str, from_ms: int, to_ms: int) -> str:
    """The dashboard panel of report ``name``, its time filter expanded as the ClickHouse
    plugin expands ``$__timeFilter_ms`` (see tests/integration/test_grafana_dashboard.py)."""
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tokentrace.json").read_text())
    (panel,) = [
        p for p in dashboard["panels"] if p.get("description") == f"tokentrace report {name}"
    ]
    sql = str(panel["targets"][0]["rawSql"])
    return sql.replace(
        "$__timeFilter_ms(ts)",
        f"ts >= fromUnixTimestamp64Milli({from_ms}) AND ts <= fromUnixTimestamp64Milli({to_ms})",
    )


def test_one_p99_per_node_on_every_surface(stack: LocalStack, opened: Opened) -> None:
    """The page, GET /reports, tokentrace report, the Grafana panel and the demo's tables
    give the same p99 TTFT and ITL per node for the same store and window."""
    import json

    from rich.console import Console

    from tokentrace.serving.demo import print_report

    page = opened.page
    box = page.locator("#reports")
    from_ms, to_ms = (
        int(box.get_attribute("data-from-ms") or ""),
        int(box.get_attribute("data-to-ms") or ""),
    )
    params = {"from_ms": from_ms, "to_ms": to_ms}
    cli = subprocess.run(
        [
            sys.executable, "-m", "tokentrace", "report", *SAME_NUMBERS,
            "--data-dir", str(stack.data_dir),
            "--from-ms", str(from_ms), "--to-ms", str(to_ms), "--format", "json",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    console = Console(width=200, record=True)
    from_demo = dict(
        (rep.name, rows) for rep, rows in print_report(stack, (from_ms, to_ms), console)
    )
    demo_text = console.export_text()
    for name, p99 in SAME_NUMBERS.items():
        key = "node"
        on_page = {
            r[f"data-{key}"]: float(r[f"data-{p99}"])
            for r in _attrs(
                page,
                f"#reports table[data-report={name}] tr.report-row",
                f"data-{key}",
                f"data-{p99}",
            )
        }
        response = httpx.get(
            f"{stack.collector_http}/reports/{name}",
            params=params,
            headers=auth_headers(),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        api = {row[0]: row[body["columns"].index(p99)] for row in body["rows"]}
        grafana = {r["node"]: r[p99] for r in stack.query(_grafana_sql(name, from_ms, to_ms))}
        cli_rows = {r["node"]: r[p99] for r in from_cli[name]}
        demo = {r["node"]: r[p99] for r in from_demo[name]}
        assert len(api) >= 1 and all(v > 0 for v in api.values()), api
        assert on_page == api == cli_rows == grafana == demo, (
            on_page,
            api,
            cli_rows,
            grafana,
            demo,
        )
        for value in api.values():
            assert f"{value * 1000:.2f}" in demo_text  # as the demo prints it
    nodes = {r["node"] for r in from_cli["itl_by_decode"]}
    assert nodes == {"decode-0", "decode-1"}


def test_reports_api_names_what_is_wrong(stack: LocalStack) -> None:
    base, headers = stack.collector_http, auth_headers()
    listed = httpx.get(f"{base}/reports", headers=headers, timeout=30).json()["reports"]
    assert [r["name"] for r in listed][:1] == ["ttft_by_router"]
    assert httpx.get(f"{base}/reports", timeout=30).status_code == 401  # the token guards it
    missing = httpx.get(f"{base}/reports/nope?from_ms=0&to_ms=1", headers=headers, timeout=30)
    assert missing.status_code == 404 and "no report 'nope'" in missing.json()["error"]
    for query, named in (
        ("", "from_ms"),
        ("from_ms=0&to_ms=x", "to_ms"),
        ("from_ms=5&to_ms=5", "end after"),
    ):
        bad = httpx.get(f"{base}/reports/itl_by_decode?{query}", headers=headers, timeout=30)
        assert bad.status_code == 400 and named in bad.json()["error"], bad.text
