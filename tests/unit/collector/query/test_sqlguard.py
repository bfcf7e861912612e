"""The query API's SQL guard, judged on ClickHouse's own parse: one read of tokentrace's
data, nothing that reaches outside.

Runs against an embedded chDB store on a temporary path (one per module: chDB binds one
data path per process). Besides fixed statements, it checks the allowlists against what
the engine lists (every function, table function and setting it has that is not on a
list is refused) and fuzzes the guard with Hypothesis: whatever it accepts, the
engine's own analysis of the statement (``EXPLAIN QUERY TREE``) uses only allowed
functions and tables, and running it reads nothing from outside.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.outside import OutsideServer, outside_server
from tokentrace.collector.query import sqlallow
from tokentrace.collector.query.sqlguard import (
    MAX_STATEMENT_BYTES,
    QueryLimits,
    UnsafeQuery,
    check_statement,
    function_allowed,
    guarded_query,
    judge,
)
from tokentrace.collector.store import ReaderConfig, Store, StoreError, open_store

LIMITS = QueryLimits(max_execution_time_s=5, max_result_rows=1000, max_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("chdb")
    s = open_store(f"chdb://{path}", reader=ReaderConfig(LIMITS.settings()))
    yield s
    s.close()


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A file outside the database with a marker no statement should ever return."""
    marker = "tokentrace-canary-7f3e9a"
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text(f"{marker}\n")
    return path, marker


@pytest.fixture(scope="module")
def outside(canary: tuple[Path, str]) -> Iterator[OutsideServer]:
    """A loopback HTTP server that counts requests: a statement that reaches it got out."""
    with outside_server(canary[1]) as server:
        yield server


def _engine_names(store: Store, sql: str) -> list[tuple[Any, ...]]:
    return store.query(sql).rows


# -- what passes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select node, quantile(0.99)(itl_s) FROM tokentrace.token_latencies GROUP BY node",
        "SELECT node, quantilesExactInclusive(0.5, 0.99)(itl_s) FROM token_latencies GROUP BY node",
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SELECT sum(n) FROM r",
        "(SELECT 1) UNION ALL (SELECT 2)",
        "SELECT 1 INTERSECT SELECT 1",
        "SHOW TABLES",
        "SHOW TABLES FROM tokentrace LIKE 'req%'",
        "SHOW COLUMNS FROM requests",
        "EXPLAIN SELECT count() FROM requests",
        "EXPLAIN PLAN header = 1 SELECT 1",
        "EXPLAIN AST SELECT 1",
        "SELECT 1;",
        "SELECT 'file(x); DROP TABLE t' AS s -- file('/etc/passwd')",
        "SELECT `count`() FROM requests /* url('http://x') */",
        "SELECT count() FROM requests SETTINGS join_use_nulls = 1",
        "SELECT COUNT(*), Sum(1), MAX(number), quantileExactIf(0.5)(number, number > 1) "
        "FROM numbers(10)",
        "SELECT uniqMerge(s) FROM (SELECT uniqState(number) AS s FROM numbers(5))",
        "SELECT sum(number) FILTER (WHERE number < 8) FROM numbers(10)",
        "SELECT arrayMap(x -> x * 2, [1, 2]), row_number() OVER (ORDER BY number) FROM numbers(2)",
        "SELECT * FROM system.one",
        "SELECT name FROM system.columns WHERE database = 'tokentrace' AND table = 'requests'",
        "SELECT dummy IN system.one, 0 IN (SELECT dummy FROM system.one)",
        "SELECT * FROM values('a UInt8', 1, 2)",
        "SELECT * FROM view(SELECT number FROM numbers(3))",
        "SELECT trace_id FROM tokentrace.requests AS r "
        "JOIN tokentrace.kv_transfers AS k USING (trace_id)",
        "SELECT toStartOfInterval(ts, INTERVAL 1 minute) AS t, count() FROM requests "
        "WHERE ts > now() - INTERVAL 1 HOUR GROUP BY t ORDER BY t",
        "SELECT SpanAttributes['gen_ai.request.model'], Events.Name FROM otel_traces LIMIT 1",
    ],
)
def test_reads_of_the_database_run(store: Store, sql: str) -> None:
    guarded_query(store, sql)


def test_what_runs_is_the_engines_formatting_of_the_judged_tree(store: Store) -> None:
    checked = check_statement(store, "select /* x */ `\\x63ount`()\nFROM  requests ;")
    assert checked.sql == "SELECT count() FROM requests"


def test_parameters_are_values_in_the_judged_tree(store: Store) -> None:
    hostile = "x'); SELECT * FROM file('/etc/passwd') -- %(s)s {s:String}"
    sql = "SELECT {s:String} AS s, {n:UInt32} + 1 AS n, {a:Array(UInt8)} AS a, '%(s)s' AS p"
    checked = check_statement(store, sql, {"s": hostile, "n": 41, "a": [1, 2], "unused": 1})
    assert "{" not in checked.sql.replace(hostile.replace("'", "\\'"), "")
    result = guarded_query(store, sql, {"s": hostile, "n": 41, "a": [1, 2]})
    assert result.rows == [(hostile, 42, [1, 2], "%(s)s")]


def test_the_window_clause_of_the_latency_page_binds(store: Store) -> None:
    sql = (
        "SELECT count() FROM tokentrace.requests WHERE ts >= fromUnixTimestamp64Milli("
        "{from_ms:Int64}) AND ts < fromUnixTimestamp64Milli({to_ms:Int64}) "
        "LIMIT {n:UInt32}"
    )
    assert guarded_query(store, sql, {"from_ms": 0, "to_ms": 1 << 42, "n": 5}).rows == [(0,)]


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({}, r"give its value"),
        ({"v": {"a": 1}}, r"values are strings"),
        ({"v": 1 << 70}, r"64 bits"),
        ({"v": "\ud800"}, r"UTF-8"),
    ],
)
def test_bad_parameter_values_are_refused(store: Store, params: dict[str, Any], why: str) -> None:
    with pytest.raises(UnsafeQuery, match=why):
        check_statement(store, "SELECT {v:String}", params)


# -- what is refused, and why ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file()"),
        ("SELECT * FROM `\\x66ile`('/etc/passwd', 'LineAsString') LIMIT 2", "file()"),
        ("SELECT * FROM \"\\x66\\x69\\x6c\\x65\"('/etc/passwd')", "file()"),
        ("SELECT * FROM fi/**/le('/etc/passwd')", "ClickHouse does not parse"),
        ("SELECT file('/etc/passwd')", "function file()"),
        ("select * from URL('http://169.254.169.254/', 'LineAsString')", "URL()"),
        ("SELECT * FROM s3('https://b/k', 'CSV')", "s3()"),
        ("SELECT * FROM remote('10.0.0.1', system.one)", "remote()"),
        ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "mysql()"),
        ("SELECT * FROM python(df)", "python()"),
        ("SELECT * FROM executable('x.sh', 'TSV', 'a String')", "executable()"),
        ("SELECT * FROM eval('SELECT 1')", "eval()"),
        ("SELECT * FROM merge('system', '.*')", "merge()"),
        ("SELECT * FROM viewExplain('EXPLAIN', '', (SELECT 1))", "viewExplain()"),
        ("SELECT aiGenerate('hello')", "aiGenerate()"),
        ("SELECT getSetting('readonly')", "getSetting()"),
        ("SELECT arrayReduce('sum', [1])", "arrayReduce()"),
        ("SELECT 1 FROM numbers(1) WHERE file('/etc/passwd') != ''", "file()"),
        ("SELECT arrayMap(x -> file(x), ['/etc/passwd'])", "file()"),
        ("SELECT (SELECT * FROM file('/etc/passwd') LIMIT 1)", "file()"),
        ("WITH x AS (SELECT * FROM file('/etc/passwd')) SELECT * FROM x", "file()"),
        ("SELECT * FROM view(SELECT * FROM url('http://x', 'CSV'))", "url()"),
        ("SELECT * FROM requests WHERE trace_id IN (SELECT * FROM file('/etc/passwd'))", "file()"),
        ("EXPLAIN SELECT * FROM file('/etc/passwd')", "file()"),
        ("EXPLAIN AST SELECT file('/etc/passwd')", "file()"),
        ("SELECT * FROM system.users", "system.users"),
        ("SELECT * FROM INFORMATION_SCHEMA.tables", "INFORMATION_SCHEMA.tables"),
        ("SELECT dummy IN system.users", "system.users"),
        ("SELECT system.processes.query", "system.processes"),
        ("SELECT * FROM default.t", "default.t"),
        ("SHOW TABLES FROM system", "tokentrace's tables only"),
        ("SHOW DATABASES", "SHOW DATABASES"),
        ("SHOW COLUMNS FROM system.users", "system.users"),
        ("DESCRIBE TABLE otel_traces", "parse tree of a DescribeQuery statement"),
        ("DESCRIBE file('/etc/passwd')", "parse tree"),
        ("SHOW CREATE TABLE requests", "parse tree"),
        ("EXISTS TABLE requests", "parse tree"),
        ("SELECT 1; SELECT 2", "Multi-statements"),
        ("SELECT 1; DROP TABLE otel_traces", "Multi-statements"),
        ("INSERT INTO otel_traces SELECT * FROM otel_traces", "not INSERT"),
        ("ALTER TABLE otel_traces DELETE WHERE 1", "not ALTER"),
        ("DROP TABLE requests", "not DROP"),
        ("SYSTEM SHUTDOWN", "not SYSTEM"),
        ("KILL QUERY WHERE 1", "not KILL"),
        ("SET readonly = 0", "not SET"),
        ("CREATE TABLE t (a Int8) ENGINE = Memory", "not CREATE"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
        ("SELECT 1 INTO OUTFILE '/tmp/x' AND STDOUT", "INTO OUTFILE"),
        ("SELECT 1 FORMAT JSON", "FORMAT"),
        ("SELECT 1 SETTINGS max_execution_time = 0", "max_execution_time"),
        ("SELECT 1 SETTINGS join_use_nulls = 1, max_result_rows = 0", "max_result_rows"),
        ("SELECT 1 SETTINGS readonly = 0", "readonly"),
        ("(SELECT 1) SETTINGS max_memory_usage = 0", "max_memory_usage"),
        ("SELECT * FROM {t:Identifier}", "query parameter"),
        ("SELECT {x:Identifier}", "query parameter"),
        ("SELECT COLUMNS('a') APPLY(file) FROM requests", "ColumnsApplyTransformer"),
        ("EXPLAIN CURRENT TRANSACTION", "EXPLAIN CURRENT TRANSACTION"),
        ("EXPLAIN header = 1, max_threads = 9 SELECT 1", "max_threads"),
        ("", "empty"),
        ("  ;  ", "does not parse"),
        ("SELECT '" + "x" * MAX_STATEMENT_BYTES + "'", "bytes; the limit"),
    ],
)
def test_everything_else_is_refused_by_name(store: Store, sql: str, why: str) -> None:
    with pytest.raises(UnsafeQuery, match=re.escape(why)):
        guarded_query(store, sql)


def test_a_statement_nested_past_the_engines_depth_is_refused(store: Store) -> None:
    with pytest.raises(UnsafeQuery, match="does not parse"):
        guarded_query(store, "SELECT " + "(" * 5000 + "1" + ")" * 5000)


@pytest.mark.parametrize(
    "tree",
    [
        {"type": "SelectWithUnionQuery", "list_of_selects": {"type": "NewEngineNode"}},
        {"type": "SelectWithUnionQuery", "new_key": 1},
        {"type": "SelectWithUnionQuery", "is_outfile_append": True},
        {"type": "ExplainQuery", "kind": "EXPLAIN", "query": {"type": "ShowTablesQuery"}},
        {"type": "SelectWithUnionQuery", "x": [{"y": {"type": "Function", "name": "file"}}]},
    ],
)
def test_the_judge_fails_closed_on_what_it_does_not_know(tree: dict[str, Any]) -> None:
    with pytest.raises(UnsafeQuery):
        judge(tree, frozenset({"system", "tokentrace"}))


# -- the allowlists against the engine -----------------------------------------------


def test_every_allowed_name_is_one_the_engine_has(store: Store) -> None:
    functions = {
        name: (bool(agg), bool(ci))
        for name, agg, ci in _engine_names(
            store, "SELECT name, is_aggregate, case_insensitive FROM system.functions"
        )
    }
    table_functions = {
        n for (n,) in _engine_names(store, "SELECT name FROM system.table_functions")
    }
    # x -> y, GROUPING(...) and EXISTS (...) parse as calls of no function of their own
    parser_only = {"lambda", "grouping", "exists"}
    assert sorted(sqlallow.FUNCTIONS - functions.keys() - parser_only) == []
    assert sorted(sqlallow.AGGREGATE_FUNCTIONS - functions.keys()) == []
    assert sorted(n for n in sqlallow.AGGREGATE_FUNCTIONS if not functions[n][0]) == []
    assert sorted(n for n in sqlallow.FUNCTIONS - parser_only if functions[n][0]) == []
    allowed = sqlallow.FUNCTIONS | sqlallow.AGGREGATE_FUNCTIONS
    engine_ci = {n for n, (_, ci) in functions.items() if ci and n in allowed}
    assert sorted(sqlallow.CASE_INSENSITIVE ^ engine_ci) == []
    assert sorted(sqlallow.TABLE_FUNCTIONS - table_functions) == []
    combinators = {
        n for (n,) in _engine_names(store, "SELECT name FROM system.aggregate_function_combinators")
    }
    assert sorted(set(sqlallow.COMBINATORS) - combinators) == []


def test_no_engine_function_off_the_list_is_allowed_in_any_spelling(store: Store) -> None:
    """Letter case and combinator suffixes resolve only to listed functions: no name
    the engine has that is not on a list passes, nor one made by adding a combinator
    to an unlisted aggregate (the engine would resolve that one, not ours)."""
    rows = _engine_names(store, "SELECT name, is_aggregate FROM system.functions")
    allowed = sqlallow.FUNCTIONS | sqlallow.AGGREGATE_FUNCTIONS
    off_list = [(name, bool(agg)) for name, agg in rows if name not in allowed]
    assert len(off_list) > 300  # the engine's own: files, URLs, dictionaries, AI, ...
    wrongly = [name for name, _ in off_list if function_allowed(name)]
    wrongly += [
        name + suffix
        for name, agg in off_list
        if agg
        for suffix in sqlallow.COMBINATORS
        if function_allowed(name + suffix)
    ]
    assert wrongly == []
    for name, _ in off_list:
        for spelling in (name.upper(), name.lower(), name.capitalize()):
            if function_allowed(spelling):
                # Allowed only as another, listed function of that spelling.
                assert spelling.lower() in {n.lower() for n in sqlallow.CASE_INSENSITIVE}


def test_every_engine_table_function_off_the_list_is_refused(store: Store) -> None:
    names = [n for (n,) in _engine_names(store, "SELECT name FROM system.table_functions")]
    off_list = [n for n in names if n not in sqlallow.TABLE_FUNCTIONS]
    assert len(off_list) > 70
    for name in off_list:
        reasons = []
        # Some take a subquery rather than arguments; the first form that parses counts.
        for args in ("'x'", "SELECT 1", "SELECT 1 ELSE null('x UInt8')"):
            with pytest.raises(UnsafeQuery) as refused:
                check_statement(store, f"SELECT * FROM {name}({args})")
            reasons.append(str(refused.value))
            if "does not parse" not in reasons[-1]:
                break
        assert f"table function {name}()" in reasons[-1]


def test_every_engine_setting_off_the_list_is_refused(store: Store) -> None:
    names = [n for (n,) in _engine_names(store, "SELECT name FROM system.settings")]
    off_list = [n for n in names if n not in sqlallow.SETTINGS]
    assert len(off_list) > 1000
    for name in off_list:
        with pytest.raises(UnsafeQuery, match=f"setting {name} "):
            judge(
                {"type": "SelectWithUnionQuery", "settings_ast": _set_query(name)},
                frozenset(),
            )
    for name in sorted(sqlallow.SETTINGS):
        judge({"type": "SelectWithUnionQuery", "settings_ast": _set_query(name)}, frozenset())


def _set_query(name: str) -> dict[str, Any]:
    return {"type": "SetQuery", "changes": [{"name": name, "value": {"field_type": "UInt64"}}]}


def test_limit_settings_in_every_place_the_parser_puts_them_are_refused(store: Store) -> None:
    for template in (
        "SELECT 1 SETTINGS {s} = 0",
        "(SELECT 1) SETTINGS {s} = 0",
        "SELECT 1 UNION ALL SELECT 2 SETTINGS {s} = 0",
        "SELECT * FROM (SELECT 1 SETTINGS {s} = 0)",
        "WITH x AS (SELECT 1 SETTINGS {s} = 0) SELECT * FROM x",
        "EXPLAIN SELECT 1 SETTINGS {s} = 0",
    ):
        for setting in (
            "max_execution_time",
            "max_result_rows",
            "max_result_bytes",
            "max_memory_usage",
            "result_overflow_mode",
            "timeout_overflow_mode",
            "readonly",
            "max_threads",
            "allow_introspection_functions",
        ):
            with pytest.raises(UnsafeQuery, match=setting):
                check_statement(store, template.format(s=setting))


def test_the_read_session_holds_its_limits(store: Store) -> None:
    row = guarded_query(
        store,
        "SELECT name, value FROM system.settings WHERE name IN ('readonly', "
        "'max_execution_time', 'max_result_rows', 'max_memory_usage') ORDER BY name",
    ).rows
    assert dict(row) == {
        "max_execution_time": "5",
        "max_memory_usage": str(LIMITS.max_memory_bytes),
        "max_result_rows": "1000",
        "readonly": "2",
    }
    with pytest.raises(StoreError, match="TOO_MANY_ROWS_OR_BYTES"):
        guarded_query(store, "SELECT number FROM numbers(5000)")
    assert guarded_query(store, "SELECT currentDatabase()").rows == [("tokentrace",)]


# -- fuzzing: nothing the guard accepts reaches outside --------------------------------

_ESCAPE_LETTERS = set("abefnrtv0xN")  # backslash + these mean something else


def _spell(draw: st.DrawFn, name: str) -> str:
    """``name`` as an identifier, plain or quoted, each character maybe escaped."""
    style = draw(st.sampled_from(["plain", "back", "double", "upper"]))
    if style == "plain":
        return name
    if style == "upper":
        return name.upper()
    quote = "`" if style == "back" else '"'
    out = []
    for ch in name:
        how = draw(st.sampled_from(["as is", "hex", "backslash"]))
        if how == "hex":
            out.append(f"\\x{ord(ch):02{draw(st.sampled_from('xX'))}}")
        elif how == "backslash" and ch not in _ESCAPE_LETTERS:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return quote + "".join(out) + quote


@st.composite
def _statements(draw: st.DrawFn, canary: str, url: str) -> str:
    gap = st.sampled_from([" ", "\n", " /* c */ ", "\t", " -- c\n"])

    def g() -> str:
        return draw(gap)

    def fn(name: str, *args: str) -> str:
        return f"{_spell(draw, name)}{g() if draw(st.booleans()) else ''}({', '.join(args)})"

    def table(db: str, name: str) -> str:
        return f"{_spell(draw, db)}.{_spell(draw, name)}"

    path = f"'{canary}'"
    sources = [
        lambda: table("tokentrace", "requests"),
        lambda: "token_latencies",
        lambda: table("system", "one"),
        lambda: table("system", "users"),
        lambda: table("system", "tables"),
        lambda: table("INFORMATION_SCHEMA", "tables"),
        lambda: fn("numbers", "3"),
        lambda: fn("file", path, "'LineAsString'"),
        lambda: fn("url", f"'{url}'", "'LineAsString'"),
        lambda: fn("merge", "'system'", "'^one$'"),
        lambda: fn("view", "SELECT " + draw(expressions)),
        lambda: "(SELECT " + draw(expressions) + ")",
    ]
    expr_makers = [
        lambda: "1",
        lambda: "'a'",
        lambda: fn("lower", "'A'"),
        lambda: fn("file", path),
        lambda: fn("length", fn("file", path)),
        lambda: f"{_spell(draw, 'quantileExactIf')}(0.5)(1, 1)",
        lambda: f"arrayMap(x -> {fn('file', 'x')}, [{path}])",
        lambda: f"arrayMap(x -> {fn('upper', 'x')}, ['a'])",
        lambda: (
            "(SELECT "
            + draw(st.sampled_from(["1", f"line FROM file({path}, 'LineAsString')"]))
            + ")"
        ),
        lambda: f"0 IN {table('system', 'one')}",
        lambda: f"0 IN {table('system', 'users')}",
        lambda: f"{table('system', 'one')}.dummy",
        lambda: fn("getSetting", "'readonly'"),
        lambda: fn("currentUser"),
        lambda: fn("hostName"),
        lambda: fn("dictGet", "'d'", "'a'", "1"),
    ]
    expressions = st.sampled_from(expr_makers).map(lambda make: make())
    source = draw(st.sampled_from(sources))()
    select = f"SELECT{g()}{draw(expressions)}{g()}AS{g()}c{g()}FROM{g()}{source}"
    if draw(st.booleans()):
        select += f"{g()}SETTINGS{g()}" + draw(
            st.sampled_from(
                [
                    "join_use_nulls = 1",
                    "max_execution_time = 0",
                    "readonly = 0",
                    "max_result_rows = 0",
                ]
            )
        )
    wrap = draw(st.sampled_from(["none", "explain", "cte", "union", "subquery"]))
    if wrap == "explain":
        return f"EXPLAIN{g()}{select}"
    if wrap == "cte":
        return f"WITH{g()}w AS ({select}){g()}SELECT * FROM w"
    if wrap == "union":
        return f"({select}){g()}UNION ALL{g()}(SELECT 1)"
    if wrap == "subquery":
        return f"SELECT * FROM ({select})"
    return select


_TREE_NAME = re.compile(
    r"\b(FUNCTION|TABLE_FUNCTION|TABLE) id: \d+.*?"
    r"(function_name|table_function_name|table_name): ([^,\s]+)"
)
# Functions the analyzer adds to a statement of its own accord (never spelled by it).
_ANALYZER_ADDS = {"__getScalar", "__scalarSubqueryResult", "_CAST", "toString", "equals"}


def _outside_uses(store: Store, sql: str) -> list[str]:
    """What the engine's own analysis of ``sql`` uses that is not allowed."""
    try:
        lines = [r[0] for r in store.query(f"EXPLAIN QUERY TREE {sql}").rows]
    except StoreError:
        return []  # the analyzer refuses it (unknown column, ...): nothing can run
    bad = []
    for kind, _, name in _TREE_NAME.findall("\n".join(lines)):
        if kind == "FUNCTION" and not (function_allowed(name) or name in _ANALYZER_ADDS):
            bad.append(name)
        elif kind == "TABLE_FUNCTION" and name not in sqlallow.TABLE_FUNCTIONS:
            bad.append(name)
        elif kind == "TABLE":
            database, _, table = name.partition(".")
            if database != "tokentrace" and not (
                database == "system" and table in sqlallow.SYSTEM_TABLES
            ):
                bad.append(name)
    return bad


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_nothing_the_guard_accepts_reaches_outside(
    store: Store,
    canary: tuple[Path, str],
    outside: OutsideServer,
    data: st.DataObject,
) -> None:
    path, marker = canary
    sql = data.draw(_statements(str(path), outside.url))
    before = outside.hits
    try:
        checked = check_statement(store, sql)
    except UnsafeQuery:
        assert outside.hits == before
        return
    if checked.tree["type"] == "SelectWithUnionQuery":
        assert _outside_uses(store, checked.sql) == [], sql
    try:
        result = guarded_query(store, sql)
    except StoreError:
        result = None
    assert marker not in repr(result.rows if result else ""), sql
    assert outside.hits == before, sql
