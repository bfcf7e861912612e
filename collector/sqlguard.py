"""What the SQL query API lets through: one read of tokentrace's data, nothing else.

ClickHouse's read-only mode (the session ``/query`` runs in) refuses writes and DDL but
not reads that reach outside the database: ``file()`` reads any file on the
collector's host, ``url()``/``s3()``/``remote()``/``mysql()``… make connections to
other machines, chDB's ``python()`` reads the collector's own memory. It also runs
every statement of a ``;``-separated script. This module checks a statement before it
runs, on its tokens with string literals and comments taken out:

- exactly one statement, and a read: ``SELECT``, ``WITH``, ``SHOW``, ``DESCRIBE``,
  ``EXPLAIN`` or ``EXISTS``;
- no function or table function that reaches files, URLs, other servers, processes or
  the host's memory;
- no ``INTO OUTFILE`` / ``FROM INFILE``;
- no ``SETTINGS`` that would lift the time and result-size limits the query runs
  under (:data:`LIMIT_SETTINGS`), or the read-only mode itself.

A refused statement raises :class:`UnsafeQuery` naming what was refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .store import QueryResult, Store

__all__ = [
    "LIMIT_SETTINGS",
    "QueryLimits",
    "UnsafeQuery",
    "check_read_only_sql",
    "guarded_query",
]

_READ_STATEMENTS = frozenset({"select", "with", "show", "describe", "desc", "explain", "exists"})

# Functions and table functions that read or write outside tokentrace's tables: the
# host's files and processes, other servers, object stores, the process's memory.
_OUTSIDE = frozenset(
    name.lower()
    for name in (
        "file",
        "fileCluster",
        "url",
        "urlCluster",
        "s3",
        "s3Cluster",
        "gcs",
        "oss",
        "cosn",
        "azureBlobStorage",
        "azureBlobStorageCluster",
        "hdfs",
        "hdfsCluster",
        "remote",
        "remoteSecure",
        "cluster",
        "clusterAllReplicas",
        "mysql",
        "postgresql",
        "mongodb",
        "redis",
        "sqlite",
        "jdbc",
        "odbc",
        "executable",
        "executablePool",
        "input",
        "python",
        "iceberg",
        "icebergS3",
        "icebergAzure",
        "icebergHDFS",
        "icebergLocal",
        "icebergS3Cluster",
        "icebergAzureCluster",
        "icebergHDFSCluster",
        "deltaLake",
        "deltaLakeS3",
        "deltaLakeAzure",
        "deltaLakeLocal",
        "deltaLakeCluster",
        "hudi",
        "hudiCluster",
        "paimon",
        "paimonS3",
        "paimonLocal",
        "paimonHDFS",
        "paimonAzure",
        "arrowFlight",
        "arrowflight",
        "ytsaurus",
        "kafka",
        "dictionary",
        "dictGet",
        "loop",
        "fuzzJSON",
        "fuzzQuery",
        "prometheusQuery",
        "prometheusQueryRange",
        "timeSeriesData",
        "timeSeriesMetrics",
        "timeSeriesTags",
        "mergeTreeIndex",
        "mergeTreeProjection",
        "filesystem",
        "parquetMetadata",
    )
)

#: Settings a query may not set: they would lift its limits or the read-only mode.
LIMIT_SETTINGS = frozenset(
    {
        "readonly",
        "max_execution_time",
        "max_result_rows",
        "max_result_bytes",
        "result_overflow_mode",
        "timeout_overflow_mode",
        "max_rows_to_read",
        "max_bytes_to_read",
        "read_overflow_mode",
        "max_memory_usage",
        "allow_ddl",
        "allow_introspection_functions",
    }
)

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    | (?P<quoted>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    | (?P<word>[A-Za-z_][A-Za-z_0-9$]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


class UnsafeQuery(ValueError):
    """The statement is not a single read of tokentrace's data; the message says why."""


@dataclass(frozen=True)
class QueryLimits:
    """What every query through the API runs under (ClickHouse settings)."""

    max_execution_time_s: float = 30.0
    max_result_rows: int = 100_000

    def settings(self) -> dict[str, object]:
        return {
            "max_execution_time": self.max_execution_time_s,
            "max_result_rows": self.max_result_rows,
            "result_overflow_mode": "throw",
        }


def _tokens(sql: str) -> list[tuple[str, str]]:
    """``(kind, text)`` of every token but spaces and comments; quoted identifiers come
    back unquoted as words, string literals as ``string``."""
    out: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup or "other"
        text = m.group()
        if kind in ("space", "comment"):
            continue
        if kind == "quoted":
            out.append(("word", text[1:-1]))
        else:
            out.append((kind, text))
    return out


def check_read_only_sql(sql: str) -> None:
    """Raise :class:`UnsafeQuery` unless ``sql`` is one read statement that stays within
    the database (see the module's docstring)."""
    tokens = _tokens(sql)
    # One statement: a ';' may only end it.
    for i, (kind, text) in enumerate(tokens):
        if kind == "other" and text == ";" and any(t != ";" for _, t in tokens[i + 1 :]):
            raise UnsafeQuery("one statement per query: remove everything after the ';'")
    tokens = [t for t in tokens if t != ("other", ";")]
    if not tokens:
        raise UnsafeQuery("the query is empty")
    first = tokens[0][1].lower() if tokens[0][0] == "word" else tokens[0][1]
    if first == "(":  # a parenthesised SELECT
        first = next((t.lower() for k, t in tokens if k == "word"), "")
    if first not in _READ_STATEMENTS:
        raise UnsafeQuery(
            f"only reads are allowed (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS), "
            f"not {tokens[0][1].upper()}"
        )
    words = [(i, text.lower()) for i, (kind, text) in enumerate(tokens) if kind == "word"]
    for i, word in words:
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if nxt == "(" and word in _OUTSIDE:
            raise UnsafeQuery(
                f"{word}() reaches outside tokentrace's tables (files, URLs, other servers "
                "or the collector's process); the query API only reads the database"
            )
    lowered = [text.lower() for _, text in tokens]
    for a, b in (("into", "outfile"), ("from", "infile")):
        for i in range(len(lowered) - 1):
            if lowered[i] == a and lowered[i + 1] == b:
                raise UnsafeQuery(f"{a.upper()} {b.upper()} is not allowed")
    for i, word in enumerate(lowered):
        if word == "settings":
            for j in range(i + 1, len(tokens) - 1):
                if (
                    tokens[j][0] == "word"
                    and lowered[j] in LIMIT_SETTINGS
                    and (tokens[j + 1][1] == "=")
                ):
                    raise UnsafeQuery(
                        f"the setting {lowered[j]} cannot be changed through the query API"
                    )


def guarded_query(
    store: Store,
    sql: str,
    params: dict[str, Any] | None = None,
    limits: QueryLimits | None = None,
) -> QueryResult:
    """Run a user's statement: checked, in the read-only session, under ``limits``.
    Raises :class:`UnsafeQuery` (refused before running) or ``StoreError``."""
    check_read_only_sql(sql)
    return store.query(sql, params, readonly=True, settings=(limits or QueryLimits()).settings())
