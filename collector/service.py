"""The collector process: store, write-ahead log, forwarders → pipeline → query API → OTLP
receivers.

Start order is sinks first, receivers last; shutdown runs the other way and drains the
pipeline, so every export that was acknowledged is in ClickHouse before the store
closes (or, if ClickHouse is failing, stays in the write-ahead log for the next start);
then each OTLP forwarder gets ``forward_shutdown_s`` to send what the log holds for it
(the rest waits in the log for the next start). The
two HTTP apps (OTLP/HTTP and the API) run as uvicorn servers in one asyncio loop on a
background thread; the gRPC receiver is a threaded grpc server. With ``tls`` all three
ports serve TLS with the same certificate, and none of them plaintext.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokentrace.runtime.auth import BearerAuthMiddleware, refuse_unauthenticated_exposure
from tokentrace.runtime.tls import TlsConfig
from tokentrace.schemas.ddl import query_user_statements

from .ingest import tokenspans
from .ingest.forward import ForwardConfig, OtlpForwarder, forward_reader
from .ingest.otlp_grpc import OtlpGrpcConfig, OtlpGrpcReceiver
from .ingest.otlp_http import OtlpHttpConfig, create_otlp_http_app
from .ingest.pipeline import Pipeline, PipelineConfig
from .ingest.wal import STORE_READER, LogReader, WalConfig, WriteAheadLog
from .metrics import collector_registry
from .query.api import ApiConfig, QueryCounters, create_api_app
from .query.sqlguard import QueryLimits
from .query.ui import UI_PATHS
from .servers import AsgiServers, hostport
from .store import ReaderConfig, Store, StoreError, open_store

__all__ = ["Collector", "CollectorConfig", "parse_hostport", "write_collector_file"]

_log = logging.getLogger(__name__)


#: How long a read waits for the exports acknowledged before it to be inserted (longer
#: only while ClickHouse fails: then it reads what is there).
READ_BARRIER_TIMEOUT_S = 5.0


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port); ValueError names the value."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535 in {value!r}")
    return host, port


@dataclass(frozen=True)
class CollectorConfig:
    """Everything a collector needs; ports may be 0 (pick a free one)."""

    dsn: str
    wal: WalConfig  # the write-ahead log: where, and its disk budget
    otlp_grpc: OtlpGrpcConfig = field(default_factory=OtlpGrpcConfig)
    otlp_http: OtlpHttpConfig = field(default_factory=OtlpHttpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    forward: tuple[ForwardConfig, ...] = ()  # OTLP targets every stored span goes to
    forward_shutdown_s: float = 5.0  # per target: time to catch up with the log at shutdown
    auth_token: str | None = None  # when set, every endpoint but /health requires it
    # Listening beyond loopback without a token is refused unless this says so.
    allow_unauthenticated: bool = False
    tls: TlsConfig | None = None  # when set, every port serves TLS (and only TLS)
    query_limits: QueryLimits = field(default_factory=QueryLimits)  # every read's limits
    # On a ClickHouse server: the user reads (/query, the Jaeger API) run as, and whether
    # the collector creates it (and its settings profile and grant) itself.
    query_user: str | None = None
    query_password: str = ""
    create_query_user: bool = False

    def validate(self) -> None:
        if not self.dsn or "://" not in self.dsn:
            raise ValueError(
                f"dsn must look like chdb:///path or http://host:8123, got {self.dsn!r}"
            )
        self.wal.validate()
        self.otlp_grpc.validate()
        self.otlp_http.validate()
        self.api.validate()
        self.pipeline.validate()
        urls = [f.url for f in self.forward]
        for target in self.forward:
            target.validate()
        duplicates = sorted({u for u in urls if urls.count(u) > 1})
        if duplicates:
            raise ValueError(f"forward target given more than once: {', '.join(duplicates)}")
        if self.forward_shutdown_s < 0:
            raise ValueError(f"forward_shutdown_s must be >= 0, got {self.forward_shutdown_s!r}")
        if self.tls is not None:
            self.tls.validate()
        self.query_limits.validate()
        if self.query_user is not None and self.dsn.startswith("chdb://"):
            raise ValueError(
                "a query user needs a ClickHouse server (--clickhouse http://...): "
                "the embedded store has no users"
            )
        if self.create_query_user and (self.query_user is None or not self.query_password):
            raise ValueError(
                "creating the query user needs its name and a password "
                "(--query-user and TOKENTRACE_QUERY_PASSWORD)"
            )
        refuse_unauthenticated_exposure(
            {
                "OTLP/gRPC": self.otlp_grpc.host,
                "OTLP/HTTP": self.otlp_http.host,
                "the API": self.api.host,
            },
            self.auth_token,
            self.allow_unauthenticated,
        )


class Collector:
    """One collector: owns its store (and a chDB path) from :meth:`start` to
    :meth:`shutdown`. Both are idempotent; shutdown is safe without start and blocks until
    every accepted span is stored."""

    def __init__(self, config: CollectorConfig) -> None:
        config.validate()
        self.config = config
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self.store: Store | None = None
        self.wal: WriteAheadLog | None = None
        self.pipeline: Pipeline | None = None
        self.forwarders: list[OtlpForwarder] = []
        self.queries = QueryCounters()
        self._http: AsgiServers | None = None
        self._grpc: OtlpGrpcReceiver | None = None
        self.otlp_grpc_address = ""
        self.otlp_http_address = ""
        self.api_address = ""

    def start(self) -> None:
        """Open the store and start serving; raises StoreError / OSError on failure
        (after undoing what had started)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                self._start()
            except BaseException:
                self._shutdown()
                raise

    def _start(self) -> None:
        cfg = self.config
        self.store = open_store(
            cfg.dsn,
            connect=False,
            reader=ReaderConfig(
                settings=cfg.query_limits.settings(),
                user=cfg.query_user,
                password=cfg.query_password,
            ),
            after_ddl=(
                query_user_statements(
                    cfg.query_user, cfg.query_password, cfg.query_limits.settings()
                )
                if cfg.create_query_user and cfg.query_user
                else ()
            ),
        )
        try:
            self.store.connect()
        except StoreError as exc:
            if not exc.transient or cfg.dsn.startswith("chdb://"):
                raise
            # A server that is not up yet (or down): accept spans into the log meanwhile;
            # the pipeline connects and creates the tables when it answers.
            _log.warning("%s; accepting spans into the write-ahead log until it answers", exc)
        self.wal = WriteAheadLog(
            cfg.wal,
            readers=(LogReader(STORE_READER), *(forward_reader(f.url) for f in cfg.forward)),
        )
        for target in cfg.forward:
            forwarder = OtlpForwarder(target, self.wal)
            self.forwarders.append(forwarder)
            forwarder.start()
        self.pipeline = Pipeline(self.store, self.wal, cfg.pipeline)
        # Reads see every export acknowledged before them: acknowledged at fsync, an
        # export would otherwise reach ClickHouse only with its block.
        pipeline = self.pipeline
        self.store.read_barrier = lambda: pipeline.flush(READ_BARRIER_TIMEOUT_S)
        self.pipeline.start()
        self._http = AsgiServers()
        # /metrics reads the same counters as /health, at scrape time.
        metrics = collector_registry(self.counters, (self.pipeline.insert_duration,))
        api_app: Any = create_api_app(
            self.store, self.counters, metrics=metrics, queries=self.queries
        )
        otlp_http_app: Any = create_otlp_http_app(self.pipeline, cfg.otlp_http)
        if cfg.auth_token:
            # The page's HTML and scripts hold no data; its API calls carry the token.
            api_app = BearerAuthMiddleware(
                api_app, cfg.auth_token, open_paths=("/health", *UI_PATHS)
            )
            otlp_http_app = BearerAuthMiddleware(otlp_http_app, cfg.auth_token)
        api_port = self._http.serve("API", api_app, cfg.api.host, cfg.api.port, cfg.tls)
        self.api_address = hostport(cfg.api.host, api_port)
        http_port = self._http.serve(
            "OTLP/HTTP", otlp_http_app, cfg.otlp_http.host, cfg.otlp_http.port, cfg.tls
        )
        self.otlp_http_address = hostport(cfg.otlp_http.host, http_port)
        self._grpc = OtlpGrpcReceiver(
            cfg.otlp_grpc, self.pipeline, auth_token=cfg.auth_token, tls=cfg.tls
        )
        self._grpc.start()
        self.otlp_grpc_address = hostport(cfg.otlp_grpc.host, self._grpc.port or 0)

    def shutdown(self) -> None:
        """Stop receivers, drain the pipeline, stop the API, close the store."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._grpc is not None:
            self._grpc.shutdown()
        if self._http is not None:
            self._http.stop("OTLP/HTTP")
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.forwarders:
            # Concurrently, so N dead targets cost one timeout, not N.
            threads = [
                threading.Thread(target=f.shutdown, args=(self.config.forward_shutdown_s,))
                for f in self.forwarders
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if self._http is not None:
            self._http.close()
        if self.wal is not None:
            self.wal.close()
        if self.store is not None:
            self.store.close()

    def counters(self) -> dict[str, Any]:
        """What ``GET /health`` reports: the pipeline's span counters, the query API's
        (``queries_running``, ``queries_refused``) and, with forward targets,
        ``"forwarded": {url: {sent_spans, dropped_spans, retries, pending_records}}``."""
        out: dict[str, Any] = dict(self.pipeline.counters()) if self.pipeline else {}
        out.update(self.queries.counters())
        if self.forwarders:
            out["forwarded"] = {f.config.url: f.counters() for f in self.forwarders}
        return out

    def info(self) -> dict[str, Any]:
        """What ``collector.json`` holds: pid, the bound endpoints (``HOST:PORT``), whether
        they serve TLS, and the URLs clients use (``https://`` with TLS): ``otlp_grpc_url``
        for an exporter's endpoint, ``otlp_http_url`` to POST spans to, ``http_url`` for
        the API; ``token_scanner``: ``compiled`` or ``python``."""
        scheme = "https" if self.config.tls else "http"
        return {
            "pid": os.getpid(),
            "otlp_grpc": self.otlp_grpc_address,
            "otlp_http": self.otlp_http_address,
            "http": self.api_address,
            "tls": self.config.tls is not None,
            "otlp_grpc_url": f"{scheme}://{self.otlp_grpc_address}",
            "otlp_http_url": f"{scheme}://{self.otlp_http_address}/v1/traces",
            "http_url": f"{scheme}://{self.api_address}",
            "dsn": self.config.dsn,
            "wal": self.config.wal.directory,
            "forward": [f.url for f in self.config.forward],
            # how canonical llm.token spans are read: the compiled scanner, or Python
            "token_scanner": "compiled" if tokenspans.COMPILED else "python",
        }


def write_collector_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
