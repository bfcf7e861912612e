"""The query API's SQL guard: one read of the database, nothing that reaches outside."""

from __future__ import annotations

import pytest

from tokentrace.collector.sqlguard import UnsafeQuery, check_read_only_sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select node, quantile(0.99)(itl_s) FROM tokentrace.token_latencies GROUP BY node",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "(SELECT 1) UNION ALL (SELECT 2)",
        "SHOW TABLES",
        "DESCRIBE TABLE otel_traces",
        "EXPLAIN SELECT 1",
        "SELECT 1;",
        "SELECT 'file(x); DROP TABLE t' AS s -- file('/etc/passwd')",
        "SELECT `file` FROM t /* url('http://x') */",
        "SELECT count() FROM requests SETTINGS max_threads = 1",
        "SELECT filename FROM t WHERE profile = 'x'",
    ],
)
def test_reads_of_the_database_pass(sql: str) -> None:
    check_read_only_sql(sql)


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT file('/etc/passwd')", "file()"),
        ("select * from URL('http://169.254.169.254/', 'LineAsString')", "url()"),
        ("SELECT * FROM s3('https://b/k', 'CSV')", "s3()"),
        ("SELECT * FROM remote('10.0.0.1', system.one)", "remote()"),
        ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", "mysql()"),
        ("SELECT * FROM Python(df)", "python()"),
        ("SELECT * FROM \"file\"('/etc/passwd')", "file()"),
        ("SELECT * FROM executable('x.sh', 'TSV', 'a String')", "executable()"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELECT 1; DROP TABLE otel_traces", "one statement"),
        ("INSERT INTO otel_traces SELECT * FROM otel_traces", "only reads"),
        ("ALTER TABLE otel_traces DELETE WHERE 1", "only reads"),
        ("DROP TABLE requests", "only reads"),
        ("SYSTEM SHUTDOWN", "only reads"),
        ("KILL QUERY WHERE 1", "only reads"),
        ("SET readonly = 0", "only reads"),
        ("CREATE TABLE t (a Int8) ENGINE = Memory", "only reads"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
        ("SELECT 1 SETTINGS max_execution_time = 0", "max_execution_time"),
        ("SELECT 1 SETTINGS max_threads = 1, max_result_rows = 0", "max_result_rows"),
        ("SELECT 1 SETTINGS readonly = 0", "readonly"),
        ("", "empty"),
        ("  ;  ", "empty"),
    ],
)
def test_everything_else_is_refused_by_name(sql: str, why: str) -> None:
    with pytest.raises(UnsafeQuery, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_read_only_sql(sql)
