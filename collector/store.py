"""ClickHouse behind one narrow interface: ``insert(table, columns)`` and ``query(sql)``.

The DSN picks the backend through clickhouse-connect: ``chdb:///path`` (embedded chDB,
in-process) or ``http(s)://host:8123`` (a ClickHouse server). Both are the same code
path. Every clickhouse-connect / chDB exception leaves this module as a
:class:`StoreError` that says whether retrying can help.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tokentrace.schemas import DATABASE, ddl_statements, upgrade_statements

from .native import Column, Encoded, NativeTypeError, Repeated, encode_block, wire_type
from .retry import CollectorError

__all__ = ["NsDatetime", "QueryResult", "ReaderConfig", "Store", "StoreError", "open_store"]

# ClickHouse error codes worth retrying: timeouts, network, memory, disk space and load
# limits, replicas/keeper temporarily unavailable.
_TRANSIENT_CODES = frozenset({159, 160, 202, 209, 210, 241, 242, 243, 252, 285, 319, 425, 999})
_CODE_RE = re.compile(r"Code: (\d+)\.")
_NUMERIC_ARRAY = re.compile(r"^Array\((Nullable\()?U?Int|^Array\((Nullable\()?Float")


class StoreError(CollectorError):
    """A ClickHouse operation failed.

    ``transient`` is True when retrying later may succeed (connection refused, timeout,
    server overloaded); False for permanent errors (bad SQL, type mismatch, readonly).
    ``code`` is ClickHouse's error code when it sent one.
    """

    def __init__(self, message: str, *, transient: bool, code: int | None = None) -> None:
        super().__init__(message, transient=transient)
        self.code = code


class NsDatetime(datetime):
    """A UTC datetime that keeps the nanoseconds a ``DateTime64(9)`` value carries.

    Behaves as a ``datetime`` (microsecond precision); ``nanosecond`` holds the three
    extra digits, ``ns`` the whole value as integer nanoseconds since the epoch, and
    ``isoformat()`` prints all nine fractional digits.
    """

    nanosecond: int
    ns: int

    @classmethod
    def from_ns(cls, ns: int) -> NsDatetime:
        seconds, rem = divmod(ns, 1_000_000_000)
        micros, nanos = divmod(rem, 1000)
        base = _EPOCH + timedelta(seconds=seconds, microseconds=micros)
        value = cls(
            base.year,
            base.month,
            base.day,
            base.hour,
            base.minute,
            base.second,
            base.microsecond,
            tzinfo=UTC,
        )
        value.nanosecond = nanos
        value.ns = ns
        return value

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        if timespec != "auto":
            return super().isoformat(sep, timespec)
        head = datetime(
            self.year, self.month, self.day, self.hour, self.minute, self.second
        ).isoformat(sep)
        return f"{head}.{self.microsecond:06d}{self.nanosecond:03d}Z"

    def __str__(self) -> str:
        return self.isoformat(" ")

    def __reduce__(self) -> Any:
        return (NsDatetime.from_ns, (self.ns,))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class QueryResult:
    """Column names, ClickHouse type names and rows (tuples) of one query.

    ``DateTime64`` values (also inside ``Nullable``/``Array``) are :class:`NsDatetime`
    so sub-microsecond precision survives.
    """

    column_names: tuple[str, ...]
    column_types: tuple[str, ...]
    rows: list[tuple[Any, ...]]


def _classify(exc: BaseException, what: str) -> StoreError:
    from clickhouse_connect.driver import exceptions as ch

    message = str(exc).strip() or type(exc).__name__
    match = _CODE_RE.search(message)
    code = int(match.group(1)) if match else None
    if isinstance(exc, ch.OperationalError | ConnectionError | TimeoutError | OSError):
        transient = True
    elif code is not None:
        transient = code in _TRANSIENT_CODES
    else:
        # No server error code: a client-side problem (bad data, bad arguments).
        transient = False
    return StoreError(f"{what}: {message}", transient=transient, code=code)


def _converter(type_name: str) -> Callable[[Any], Any] | None:
    """Turns the raw ticks of DateTime64 values of ``type_name`` into NsDatetime."""
    inner = type_name
    for wrapper in ("Nullable(", "LowCardinality("):
        if inner.startswith(wrapper):
            inner = inner[len(wrapper) : -1]
    if inner.startswith("DateTime64("):
        precision = int(inner[len("DateTime64(") :].split(",")[0].split(")")[0])
        scale = 10 ** (9 - precision)
        return lambda v: None if v is None else NsDatetime.from_ns(int(v) * scale)
    if inner.startswith("Array("):
        element = _converter(inner[len("Array(") : -1])
        if element is None:
            return None
        return lambda v: None if v is None else [element(x) for x in v]
    return None


@dataclass(frozen=True)
class ReaderConfig:
    """How :meth:`Store.query` with ``readonly=True`` connects: the ClickHouse settings
    its session runs under (the query limits), and on a server the user it connects as
    (``None``: the DSN's own user, in ``readonly=2``). chDB has no users."""

    settings: Mapping[str, Any] = field(default_factory=dict)
    user: str | None = None
    password: str = ""


class Store:
    """One ClickHouse connection for writes and one for reads; thread-safe.

    Writes (and DDL) are serialised on one lock, reads on another, so a long read never
    holds up an insert and, once connected, an insert never holds up a read. chDB
    allows one process to own a data path: whoever opens a ``chdb://`` store owns it
    until :meth:`close`. Calls block until ClickHouse answers.
    """

    def __init__(
        self,
        client: Any,
        dsn: str,
        database: str,
        reader: ReaderConfig | None = None,
        after_ddl: Sequence[str] = (),
    ) -> None:
        self._client = client  # None until :meth:`connect` succeeds
        # Reads with readonly=True go through a second session that is read-only (and
        # limited) from the start: per-query readonly on a chDB session can stick after a
        # refused write (the client cannot SET it back), leaving the writer read-only.
        self._readonly_client: Any = None
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self.dsn = dsn
        self.database = database
        self.reader = reader or ReaderConfig()
        self._after_ddl = tuple(after_ddl)
        #: Called before every read with ``readonly=True`` (the collector's: insert what
        #: was acknowledged before the read, so the read sees it); None: nothing.
        self.read_barrier: Callable[[], object] | None = None
        self._types: dict[str, dict[str, str]] = {}  # per table, for Native inserts

    def insert(
        self,
        table: str,
        columns: Mapping[str, Column],
        dedup_token: str | None = None,
    ) -> None:
        """Insert rows given column-wise into ``table`` (unqualified: this store's database).

        DateTime64 values are integer nanoseconds since the epoch; Map columns take dicts,
        Nested sub-columns (``Events.Name``) take one list per row. An insert repeated
        with the same ``dedup_token`` (ClickHouse's ``insert_deduplication_token``) is
        dropped by ClickHouse, also in the tables materialized views fill from it; without
        one the insert gets a fresh token, so identical rows inserted twice are kept.
        """
        names = list(columns)
        if not names or not len(columns[names[0]]):
            return
        settings = {
            # Every insert carries a token: tokenless inserts fall back to deduplicating
            # by a hash of the data, and (seen in chDB 26) a mix of the two made later
            # tokens forget earlier ones across restarts.
            "insert_deduplication_token": dedup_token or uuid.uuid4().hex,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        }
        with self._lock:
            client = self._connected()
            types = self._column_types(client, table)
            missing = [name for name in names if name not in types]
            if missing:
                raise StoreError(
                    f"insert into {self.database}.{table} failed: no column {missing[0]!r}",
                    transient=False,
                )
            try:
                if any(isinstance(columns[n], Encoded | Repeated) for n in names) or any(
                    _NUMERIC_ARRAY.match(wire_type(types[n])) for n in names
                ):
                    # Arrays of numbers (token emissions): whole arrays at a time; columns
                    # already in Native layout (token spans): as they are.
                    block = encode_block(columns, types)
                    client.raw_insert(
                        f"{self.database}.{table}",
                        column_names=names,
                        insert_block=block,
                        settings=settings,
                        fmt="Native",
                    )
                else:
                    # Rows of strings and maps: clickhouse-connect's compiled encoder,
                    # told the types (else it asks ClickHouse for them every insert).
                    client.insert(
                        table,
                        [list(columns[name]) for name in names],  # type: ignore[arg-type]
                        column_names=names,
                        column_type_names=[types[n] for n in names],
                        database=self.database,
                        column_oriented=True,
                        settings=settings,
                    )
            except (NativeTypeError, ValueError, TypeError) as exc:
                raise StoreError(
                    f"insert into {self.database}.{table} failed: {exc}", transient=False
                ) from exc
            except Exception as exc:
                raise _classify(exc, f"insert into {self.database}.{table} failed") from exc

    def _column_types(self, client: Any, table: str) -> dict[str, str]:
        """``table``'s column types (name → type), read once per connection."""
        types = self._types.get(table)
        if types is None:
            try:
                rows = client.query(
                    "SELECT name, type FROM system.columns "
                    "WHERE database = {db:String} AND table = {t:String}",
                    parameters={"db": self.database, "t": table},
                ).result_rows
            except Exception as exc:
                raise _classify(exc, f"reading the columns of {self.database}.{table}") from exc
            types = {str(n): str(t) for n, t in rows}
            if types:  # a table not there yet is asked about again next time
                self._types[table] = types
        return types

    def query(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        readonly: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> QueryResult:
        """Run one statement; ``params`` bind ``{name:Type}`` placeholders; ``settings``
        are ClickHouse settings for this query only (not with ``readonly``: that session
        has its own, see :class:`ReaderConfig`).

        ``readonly`` runs it in the read session: ClickHouse ``readonly=2`` (per-query
        settings allowed, ``readonly`` itself not) or the reader's own user, under the
        reader's settings, concurrently with writes.
        """
        if readonly and settings:
            raise ValueError("readonly queries run under the reader's settings; pass none")
        if readonly and self.read_barrier is not None:
            self.read_barrier()
        if not readonly:
            with self._lock:
                return self._run(self._connected(), sql, params, settings)
        if self._client is None:  # the tables exist before anything reads them
            with self._lock:
                self._connected()
        # Once connected, a read never takes the writers' lock: it does not wait
        # behind an insert, nor an insert behind it.
        with self._read_lock:
            self._check_open()
            try:
                return self._run(self._reader(), sql, params, None)
            except StoreError:
                # A query that fails part-way (a result limit thrown mid-stream) can
                # leave its unread rows in a chDB session, to be returned as the next
                # query's result: start the next read on a fresh session.
                self._drop_reader()
                raise

    @staticmethod
    def _run(
        client: Any, sql: str, params: dict[str, Any] | None, settings: dict[str, Any] | None
    ) -> QueryResult:
        try:
            result = client.query(
                sql,
                parameters=params,
                settings=settings,
                query_formats={"DateTime64": "int"},
            )
            names = tuple(result.column_names)
            types = tuple(t.name for t in result.column_types)
            raw_rows = result.result_rows
        except StoreError:
            raise
        except Exception as exc:
            raise _classify(exc, "query failed") from exc
        converters = [_converter(t) for t in types]
        if any(converters):
            rows = [
                tuple(c(v) if c else v for c, v in zip(converters, row, strict=True))
                for row in raw_rows
            ]
        else:
            rows = [tuple(row) for row in raw_rows]
        return QueryResult(names, types, rows)

    def _reader(self) -> Any:
        if self._readonly_client is not None:
            return self._readonly_client
        import clickhouse_connect

        reader = self.reader
        try:
            if self.dsn.startswith("chdb://"):
                # chDB appends per-query settings to the statement as a SETTINGS clause,
                # which breaks statements with one of their own: set them on the session.
                client = clickhouse_connect.get_client(dsn=self.dsn, database=self.database)
                try:
                    for name, value in reader.settings.items():
                        client.command(f"SET {name} = {_setting_literal(value)}")
                    client.command("SET readonly = 2")
                except BaseException:
                    client.close()
                    raise
            elif reader.user is not None:
                # The user's settings profile makes it read-only.
                client = clickhouse_connect.get_client(
                    dsn=self.dsn,
                    database=self.database,
                    username=reader.user,
                    password=reader.password,
                    settings=dict(reader.settings),
                )
            else:
                client = clickhouse_connect.get_client(
                    dsn=self.dsn,
                    database=self.database,
                    settings={**reader.settings, "readonly": 2},
                )
        except Exception as exc:
            who = f" as {reader.user}" if reader.user else ""
            raise _classify(exc, f"cannot open a read session on {self.dsn}{who}") from exc
        self._readonly_client = client
        return client

    def _drop_reader(self) -> None:
        client, self._readonly_client = self._readonly_client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken session may not close cleanly
                pass

    def command(self, sql: str) -> None:
        """Run one statement that returns nothing (DDL)."""
        with self._lock:
            client = self._connected()
            try:
                client.command(sql)
            except Exception as exc:
                raise _classify(exc, "command failed") from exc

    def close(self) -> None:
        """Release the connection (and a chDB path); idempotent."""
        with self._lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            for client in (self._readonly_client, self._client):
                try:
                    if client is not None:
                        client.close()
                except Exception:  # noqa: BLE001 - closing must not raise
                    pass

    def connect(self) -> None:
        """Connect and create tokentrace's tables if that has not happened yet; raises
        :class:`StoreError` (transient if the server cannot be reached). Every other
        method does this first, so a store opened while ClickHouse was down starts
        working when ClickHouse does."""
        with self._lock:
            self._connected()

    def _connected(self) -> Any:
        self._check_open()
        if self._client is not None:
            return self._client
        import clickhouse_connect

        try:
            client = clickhouse_connect.get_client(dsn=self.dsn)
        except Exception as exc:
            raise _classify(exc, f"cannot connect to {self.dsn}") from exc
        try:
            tables = client.query(
                "SELECT name, engine FROM system.tables WHERE database = {db:String}",
                parameters={"db": self.database},
            ).result_rows
            engines: dict[str, str] = {str(name): str(engine) for name, engine in tables}
            for statement in upgrade_statements(engines, self.database):
                client.command(statement)
            for statement in ddl_statements(self.database):
                client.command(statement)
        except Exception as exc:
            client.close()
            raise _classify(exc, f"creating tokentrace's tables in {self.dsn} failed") from exc
        try:
            for statement in self._after_ddl:
                client.command(statement)
        except Exception as exc:
            client.close()
            what = " ".join(statement.split()[:5])
            raise _classify(exc, f"{what} … in {self.dsn} failed") from exc
        # Unqualified table names in queries mean tokentrace's tables.
        client.database = self.database
        _without_pandas()
        self._client = client
        return client

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.dsn} is closed", transient=False)


def open_store(
    dsn: str,
    database: str = DATABASE,
    *,
    connect: bool = True,
    reader: ReaderConfig | None = None,
    after_ddl: Sequence[str] = (),
) -> Store:
    """A store for ``dsn`` with tokentrace's tables created if they are missing.

    ``chdb:///abs/path`` creates the directory on first use. Raises :class:`StoreError`
    (transient if the server cannot be reached); with ``connect=False`` nothing is
    contacted yet and the first use connects (see :meth:`Store.connect`). ``reader``
    says how reads with ``readonly=True`` connect (their limits and, on a server, user);
    ``after_ddl`` statements run after tokentrace's DDL on every (re)connect.
    """
    if not dsn or "://" not in dsn:
        raise ValueError(
            f"ClickHouse DSN must look like chdb:///path or http://host:8123, got {dsn!r}"
        )
    if dsn.startswith("chdb://"):
        import os
        from pathlib import Path

        Path(dsn[len("chdb://") :]).mkdir(parents=True, exist_ok=True)
        # chDB's jemalloc keeps freed pages for 5 s (ClickHouse's server setting), which
        # in a collector under load is a few hundred MB of resident memory it is not
        # using. Read once, when chDB is first loaded; a value already set wins.
        os.environ.setdefault("JE_MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:0")
    store = Store(None, dsn, database, reader, after_ddl)
    if connect:
        try:
            store.connect()
        except BaseException:
            store.close()
            raise
    return store


def _without_pandas() -> None:
    """Tell clickhouse-connect pandas is not there. It would import it on the first insert
    only to ask whether the data is a DataFrame -- ~0.5 s of CPU in the middle of a load
    and ~70 MB of resident memory for nothing: the store inserts and reads plain columns.
    (Where clickhouse-connect resolves its optional modules differently, nothing changes.)
    """
    from clickhouse_connect.driver import options

    if hasattr(options, "_resolve_pandas") and "pd" not in vars(options):
        vars(options)["pd"] = None
        vars(options)["pd_time_test"] = None


def _setting_literal(value: Any) -> str:
    """A setting's value as SQL: numbers as they are, anything else a quoted string."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
