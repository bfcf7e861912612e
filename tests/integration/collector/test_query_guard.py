"""``POST /query`` and ``tokentrace query`` against a real collector: hostile statements
are refused before anything is read, the engine's own lists are refused name by name,
legitimate statements (the README's) run, and reads hit their limits without holding
up ingest.

A file outside the database holds a marker and a loopback HTTP server counts requests:
no response may carry the marker and the server must never be asked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from collector_process import Running, running_collector
from otlp_payloads import new_trace_id, post, request, span

from tests.outside import OutsideServer, outside_server
from tokentrace.collector.query import sqlallow

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[3]
MARKER = "tokentrace-canary-41c2d0"
TIME_LIMIT_S = 6


@pytest.fixture(scope="module")
def outside() -> Iterator[OutsideServer]:
    with outside_server(MARKER) as server:
        yield server


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_collector(
        tmp_path_factory.mktemp("guard"),
        "--query-timeout",
        str(TIME_LIMIT_S),
        "--query-max-rows",
        "1000",
        "--query-max-memory",
        "64M",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text(f"{MARKER}\n")
    return path


def _post(running: Running, sql: str, params: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"sql": sql}
    if params is not None:
        body["params"] = params
    return httpx.post(f"{running.api}/query", json=body, timeout=60)


def _rows(running: Running, sql: str) -> list[dict[str, Any]]:
    resp = _post(running, sql)
    assert resp.status_code == 200, (sql, resp.text)
    body = resp.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def _spellings(name: str) -> list[str]:
    """``name`` as the engine accepts it and a token check would not: quoted, every
    character hex-escaped (lower- and upper-case digits), in double quotes, mixed."""
    lower = "".join(f"\\x{ord(c):02x}" for c in name)
    upper = "".join(f"\\x{ord(c):02X}" for c in name)
    mixed = name[0] + upper[4:]
    return [name, f"`{name}`", f'"{name}"', f"`{lower}`", f"`{upper}`", f'"{lower}"', f"`{mixed}`"]


def _hostile(secret: Path, url: str, data_dir: Path) -> list[tuple[str, str]]:
    """(statement, what the refusal names)."""
    path = f"'{secret}'"
    out: list[tuple[str, str]] = []
    for spelled in _spellings("file"):
        out += [
            (f"SELECT * FROM {spelled}({path}, 'LineAsString')", "file()"),
            (f"SELECT {spelled}({path})", "file()"),
        ]
    for spelled in _spellings("url"):
        out.append((f"SELECT * FROM {spelled}('{url}', 'LineAsString')", "url()"))
    for spelled in _spellings("system"):
        out.append((f"SELECT * FROM {spelled}.users", "system.users"))
    reads = [
        f"SELECT line FROM file({path}, 'LineAsString')",
        f"SELECT * FROM url('{url}', 'LineAsString')",
    ]
    for read in reads:
        name = "file()" if "file(" in read else "url()"
        out += [
            # comments and whitespace in odd places
            (read.replace(" FROM ", "/* x */FROM\n\t").replace("(", " /* ( */ (", 1), name),
            ("-- leading comment\n" + read + " -- trailing", name),
            (read.replace("SELECT", "SELECT /*+ hint */", 1), name),
            # nested subqueries and CTEs
            (f"SELECT * FROM (SELECT * FROM ({read}))", name),
            (f"SELECT (SELECT count() FROM ({read}))", name),
            (f"WITH x AS ({read}) SELECT * FROM x", name),
            (f"WITH x AS (SELECT 1), y AS ({read}) SELECT * FROM x, y", name),
            (f"SELECT * FROM tokentrace.requests WHERE trace_id IN ({read})", name),
            (f"SELECT * FROM view({read})", name),
            (f"SELECT 1 UNION ALL {read}", name),
            (f"SELECT 1 INTERSECT {read}", name),
            (f"SELECT * FROM numbers(1) AS n JOIN ({read}) AS r ON 1", name),
            (f"SELECT arrayMap(x -> (SELECT count() FROM ({read})), [1])", name),
            (f"SELECT count() OVER (PARTITION BY ({read} LIMIT 1)) FROM numbers(1)", name),
            # wrappers
            (f"EXPLAIN {read}", name),
            (f"EXPLAIN AST {read}", name),
            (f"EXPLAIN SYNTAX {read}", name),
            (f"EXPLAIN PIPELINE {read}", name),
            (f"EXPLAIN QUERY TREE {read}", name),
            (f"EXPLAIN ESTIMATE {read}", name),
        ]
    out += [
        (f"DESCRIBE file({path}, 'LineAsString')", "parse tree"),
        (f"DESC (SELECT * FROM file({path}))", "parse tree"),
        ("SHOW CREATE TABLE system.users", "parse tree"),
        ("SHOW PROCESSLIST", "parse tree"),
        ("SHOW GRANTS", "parse tree"),
        ("SHOW USERS", "parse tree"),
        ("SHOW DATABASES", "SHOW DATABASES"),
        ("SHOW TABLES FROM system", "tokentrace's tables only"),
        ("SHOW COLUMNS FROM system.users", "system.users"),
        ("SELECT * FROM system.processes", "system.processes"),
        ("SELECT dummy IN system.users", "system.users"),
        ("SELECT system.users.name", "system.users"),
        ("SELECT * FROM INFORMATION_SCHEMA.tables", "INFORMATION_SCHEMA.tables"),
        ("SELECT * FROM merge('system', '.*')", "merge()"),
        ("SELECT * FROM remote('127.0.0.1', system.one)", "remote()"),
        (f"SELECT * FROM executable('cat {secret}', 'TSV', 'a String')", "executable()"),
        ("SELECT * FROM python(x)", "python()"),
        ("SELECT * FROM eval('SELECT 1')", "eval()"),
        (f"SELECT 1 INTO OUTFILE '{data_dir / 'written.txt'}'", "INTO OUTFILE"),
        (f"SELECT 1 INTO OUTFILE '{data_dir / 'written.txt'}' AND STDOUT", "INTO OUTFILE"),
        ("SELECT 1 FORMAT CSV", "FORMAT"),
        ("SELECT * FROM tokentrace.requests FORMAT JSON SETTINGS max_threads = 2", "FORMAT"),
        ("SELECT * FROM {t:Identifier}", "query parameter"),
        ("SELECT 1; SELECT 2", "Multi-statements"),
        ("SELECT 1;\nDROP TABLE tokentrace.otel_traces", "Multi-statements"),
        ("DROP TABLE tokentrace.otel_traces", "not DROP"),
        ("INSERT INTO tokentrace.node_clocks (node) VALUES ('x')", "parse tree"),
        ("INSERT INTO tokentrace.node_clocks SELECT * FROM tokentrace.node_clocks", "not INSERT"),
        ("SET readonly = 0", "not SET"),
        ("SYSTEM SHUTDOWN", "not SYSTEM"),
    ]
    for setting in (
        "max_execution_time",
        "timeout_overflow_mode",
        "max_result_rows",
        "max_result_bytes",
        "result_overflow_mode",
        "max_memory_usage",
        "max_rows_to_read",
        "max_bytes_to_read",
        "readonly",
        "max_threads",
        "allow_introspection_functions",
    ):
        value = "'break'" if setting.endswith("overflow_mode") else "0"
        out += [
            (f"SELECT 1 SETTINGS {setting} = {value}", setting),
            (f"(SELECT 1) SETTINGS {setting} = {value}", setting),
            (f"SELECT * FROM (SELECT 1 SETTINGS {setting} = {value})", setting),
        ]
    for function in ("file", "getSetting", "currentUser", "hostName", "getMacro", "aiGenerate"):
        out.append((f"SELECT {function}('x')", f"{function}()"))
    return out


def test_hostile_statements_are_refused_and_read_nothing(
    collector: Running, secret: Path, outside: OutsideServer
) -> None:
    corpus = _hostile(secret, outside.url, collector.data_dir)
    assert len(corpus) > 120
    before = outside.hits
    for sql, why in corpus:
        resp = _post(collector, sql)
        assert resp.status_code == 400, (sql, resp.text)
        error = resp.json()["error"]
        assert error.startswith("refused: ") and why in error, (sql, error)
        assert MARKER not in resp.text
    assert outside.hits == before, "a statement reached the outside server"
    assert not (collector.data_dir / "written.txt").exists()
    health = httpx.get(f"{collector.api}/health", timeout=10).json()
    assert health["queries_refused"] >= len(corpus) and health["queries_running"] == 0


def test_parameters_cannot_change_the_statement(collector: Running, secret: Path) -> None:
    hostile = f"') UNION ALL SELECT line FROM file('{secret}', 'LineAsString') --"
    resp = _post(collector, "SELECT {s:String} AS s, '%(s)s' AS p", {"s": hostile})
    assert resp.status_code == 200, resp.text
    assert resp.json()["rows"] == [[hostile, "%(s)s"]]
    assert MARKER not in resp.text


def test_every_table_function_the_engine_lists_off_the_allowlist_is_refused(
    collector: Running,
) -> None:
    names = _rows(collector, "SELECT groupArray(name) AS n FROM system.table_functions")[0]["n"]
    off_list = sorted(set(names) - sqlallow.TABLE_FUNCTIONS)
    assert len(off_list) > 70 and {"file", "url", "s3", "remote", "mysql"} <= set(off_list)
    for name in off_list:
        for args in ("'x'", "SELECT 1", "SELECT 1 ELSE null('x UInt8')"):
            error = _post(collector, f"SELECT * FROM `{name}`({args})").json()["error"]
            if "does not parse" not in error:
                break
        assert f"table function {name}()" in error, (name, error)


def test_every_function_the_engine_lists_off_the_allowlist_is_refused(collector: Running) -> None:
    names = _rows(collector, "SELECT groupArray(name) AS n FROM system.functions")[0]["n"]
    off_list = sorted(set(names) - sqlallow.FUNCTIONS - sqlallow.AGGREGATE_FUNCTIONS)
    assert len(off_list) > 300 and {"file", "dictGet", "joinGet", "aiGenerate"} <= set(off_list)
    for name in off_list:
        resp = _post(collector, f"SELECT `{name}`(1)")
        assert resp.status_code == 400, (name, resp.text)
        assert f"function {name}()" in resp.json()["error"], (name, resp.text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentrace", "query", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tokentrace_query_refuses_them_too(
    collector: Running, secret: Path, tmp_path: Path
) -> None:
    """Through the running collector, and opening a store itself (no collector)."""
    corpus = [
        (f"SELECT * FROM `\\x66ile`('{secret}', 'LineAsString')", "file()"),
        (f"WITH x AS (SELECT {secret.name!r} AS f) SELECT file('{secret}') FROM x", "file()"),
        ("EXPLAIN SELECT * FROM system.users", "system.users"),
        ("SELECT 1 SETTINGS max_execution_time = 0", "max_execution_time"),
    ]
    for data_dir in (collector.data_dir, tmp_path):
        for sql, why in corpus:
            out = _cli(sql, "--data-dir", str(data_dir))
            assert out.returncode == 1 and "refused: " in out.stderr and why in out.stderr, (
                sql,
                out.stderr,
            )
            assert MARKER not in out.stdout + out.stderr
        ok = _cli(
            "SELECT count() AS n FROM numbers(3)", "--data-dir", str(data_dir), "--format", "csv"
        )
        assert ok.returncode == 0 and ok.stdout.splitlines() == ["n", "3"], ok.stderr


def test_the_readmes_queries_run(collector: Running) -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.findall(r'tokentrace query (?:--format \w+ )?"([^"]+)"', readme)
    statements = [sql for sql in found if sql != "<SQL>"]
    assert len(statements) >= 2
    for sql in statements:
        _rows(collector, " ".join(sql.split()))


def test_reads_stop_at_their_limits_with_a_clear_error(collector: Running) -> None:
    rows = _post(collector, "SELECT number FROM numbers(5000)")
    assert rows.status_code == 422 and "result-size limit" in rows.json()["error"], rows.text
    memory = _post(collector, "SELECT groupArray(number) FROM numbers(100000000)")
    assert memory.status_code == 422 and "memory limit" in memory.json()["error"], memory.text
    assert _rows(collector, "SELECT count() AS n FROM numbers(10)") == [{"n": 10}]


def test_a_read_running_into_its_time_limit_holds_up_no_export(collector: Running) -> None:
    """While one read runs (and then stops at the time limit), an export is accepted
    and stored: reads and writes do not wait for each other."""
    answer: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: answer.append(_post(collector, "SELECT sum(number) FROM numbers(1e15)"))
    )
    slow.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{collector.api}/health", timeout=10).json()["queries_running"] != 1:
        assert time.monotonic() < deadline, "the slow read never started"
        time.sleep(0.02)
    stored_before = httpx.get(f"{collector.api}/health", timeout=10).json()["spans_stored"]
    trace_id = new_trace_id()
    now = time.time_ns()
    body = request(({}, [span(trace_id, 1, now, now + 1)])).SerializeToString()
    assert post(collector.otlp_http, body).status == 200
    while (health := httpx.get(f"{collector.api}/health", timeout=10).json())[
        "spans_stored"
    ] == stored_before:
        time.sleep(0.02)
    assert health["queries_running"] == 1, "the read finished before the export was stored"
    slow.join(timeout=60)
    assert answer[0].status_code == 422 and "time limit" in answer[0].json()["error"]
    assert _rows(
        collector, f"SELECT count() AS n FROM otel_traces WHERE TraceId = '{trace_id.hex()}'"
    ) == [{"n": 1}]
