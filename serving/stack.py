"""A whole instrumented P/D stack on one machine: collector, router, prefill and decode
workers, each its own ``tokentrace`` process with its own node id and loopback ports.

It can also hold an aggregated deployment (workers with ``--role both`` behind their
own router, ``router-agg``), beside the disaggregated one or instead of it, sending to
the same collector: ``tokentrace demo --mode both`` runs one workload against each.

Used by ``tokentrace demo`` and by the integration tests. Talks to the collector over
its HTTP query API only (serving never imports the collector).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokentrace.runtime.auth import auth_headers
from tokentrace.serving.procs import Component, free_ports

HOST = "127.0.0.1"


class QueryError(RuntimeError):
    """The collector rejected a query; the message is ClickHouse's."""


@dataclass
class LocalStack:
    data_dir: Path
    prefill_workers: int = 1
    decode_workers: int = 2
    # Workers doing both prefill and decode, behind a router of their own (aggregated).
    both_workers: int = 0
    num_blocks: int = 1024
    # The CPU engines stand in for GPUs. On one small machine they would otherwise delay
    # the router's and the client's wake-ups by whole scheduler slices, which a real
    # deployment (router on its own CPU, engines on GPUs) does not see.
    worker_nice: int = 10
    # "reference": tokentrace's own workers; "vllm": stock vLLM servers (NixlConnector)
    # run through `tokentrace instrument`, on a model generated under the data dir.
    engine: str = "reference"
    # Extra environment per node id ("prefill-0", "decode-1", "router"), e.g.
    # TOKENTRACE_CLOCK_SKEW_MS to make one node's clock disagree.
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # How the workers send token emissions ("packed" | "spans"); None: their default.
    token_spans: str | None = None
    components: list[Component] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.engine not in ("reference", "vllm"):
            raise ValueError(f"engine must be 'reference' or 'vllm', got {self.engine!r}")
        disaggregated = self.prefill_workers > 0 or self.decode_workers > 0
        if disaggregated and (self.prefill_workers < 1 or self.decode_workers < 1):
            raise ValueError(
                f"need at least one prefill and one decode worker, got "
                f"{self.prefill_workers} and {self.decode_workers}"
            )
        if self.both_workers < 0 or not (disaggregated or self.both_workers):
            raise ValueError(
                f"need prefill and decode workers or both-workers, got {self.prefill_workers} "
                f"prefill, {self.decode_workers} decode and {self.both_workers} both"
            )
        if self.both_workers and self.engine != "reference":
            raise ValueError("both-workers run the reference engine only")
        self.logs = self.data_dir / "logs"
        workers = self.prefill_workers + self.decode_workers + self.both_workers
        # All at once: ports picked one by one can repeat. Each worker gets a second
        # port for vLLM's NIXL side channel.
        ports = iter(free_ports(5 + 2 * workers))
        self.otlp_grpc = f"{HOST}:{next(ports)}"
        self.otlp_http = f"{HOST}:{next(ports)}"
        self.collector_http = f"http://{HOST}:{next(ports)}"
        disaggregated_url = f"http://{HOST}:{next(ports)}"
        aggregated_url = f"http://{HOST}:{next(ports)}"
        self.prefill = {
            f"prefill-{i}": f"http://{HOST}:{next(ports)}" for i in range(self.prefill_workers)
        }
        self.decode = {
            f"decode-{i}": f"http://{HOST}:{next(ports)}" for i in range(self.decode_workers)
        }
        self.both = {f"both-{i}": f"http://{HOST}:{next(ports)}" for i in range(self.both_workers)}
        self._side_channel_ports = {
            node: next(ports) for node in [*self.prefill, *self.decode, *self.both]
        }
        # Deployment ("disaggregated" | "aggregated") -> its router's node id and URL.
        self.router_nodes: dict[str, str] = {}
        self.router_urls: dict[str, str] = {}
        if disaggregated:
            self.router_nodes["disaggregated"] = "router-0"
            self.router_urls["disaggregated"] = disaggregated_url
        if self.both_workers:
            self.router_nodes["aggregated"] = "router-agg"
            self.router_urls["aggregated"] = aggregated_url
        # The disaggregated deployment's router when there is one, else the aggregated's.
        self.router_url = next(iter(self.router_urls.values()))
        self.collector: Component | None = None
        self.router: Component | None = None
        self.routers: dict[str, Component] = {}
        self.workers: dict[str, Component] = {}

    def worker_url(self, node: str) -> str:
        """The base URL of worker ``node`` (``prefill-0``, ``decode-1``, ``both-0``, ...)."""
        for urls in (self.prefill, self.decode, self.both):
            if node in urls:
                return urls[node]
        raise KeyError(f"no worker named {node!r}")

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.otlp_grpc}"

    def _component(
        self,
        name: str,
        args: list[str],
        nice: int = 0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        argv: list[str] | None = None,
    ) -> Component:
        comp = Component(
            name, args, self.logs / f"{name}.log", env=env, nice=nice, cwd=cwd, argv=argv
        )
        self.components.append(comp)
        return comp

    def start_collector(self) -> None:
        self.collector = self._component(
            "collector",
            [
                "collector",
                "--data-dir",
                str(self.data_dir),
                "--otlp-grpc",
                self.otlp_grpc,
                "--otlp-http",
                self.otlp_http,
                "--http",
                self.collector_http.removeprefix("http://"),
            ],
            nice=5,
        ).start()

    def start_worker(self, node: str) -> Component:
        url = self.worker_url(node)
        role = "prefill" if node in self.prefill else "both" if node in self.both else "decode"
        port = url.rsplit(":", 1)[1]
        if self.engine == "vllm":
            return self._start_vllm(node, role, int(port))
        comp = self._component(
            node,
            [
                "worker",
                "--role",
                role,
                "--host",
                HOST,
                "--port",
                port,
                "--node-id",
                node,
                "--otlp-endpoint",
                self.otlp_endpoint,
                "--data-dir",
                str(self.data_dir),
                "--num-blocks",
                str(self.num_blocks),
                *(["--token-spans", self.token_spans] if self.token_spans else []),
            ],
            nice=self.worker_nice,
            env=self.node_env.get(node),
        ).start()
        self.workers[node] = comp
        return comp

    def _start_vllm(self, node: str, role: str, port: int) -> Component:
        """A stock vLLM server. The prefill side is started through ``tokentrace
        instrument``, the decode side with plain environment variables: the two ways a
        user enables the plugin."""
        from tokentrace.runtime.layout import models_dir
        from tokentrace.serving.vllm_servers import create_hf_model, vllm_command, vllm_env

        model = create_hf_model(models_dir(self.data_dir))
        command = vllm_command(model, HOST, port, kv_role="kv_both")
        env = {**vllm_env(self._side_channel_ports[node]), **self.node_env.get(node, {})}
        if self.token_spans:
            env["TOKENTRACE_TOKEN_SPANS"] = self.token_spans
        # Not the project's root as cwd: `python -m` puts the cwd first on sys.path.
        if role == "prefill":
            comp = self._component(
                node,
                [
                    "instrument",
                    "--otlp-endpoint",
                    self.otlp_endpoint,
                    "--node-id",
                    node,
                    "--role",
                    role,
                    "--",
                    *command,
                ],
                nice=self.worker_nice,
                env=env,
                cwd=self.data_dir,
            )
        else:
            env.update(
                {
                    "TOKENTRACE_OTLP_ENDPOINT": self.otlp_endpoint,
                    "TOKENTRACE_NODE_ID": node,
                    "TOKENTRACE_ROLE": role,
                }
            )
            comp = self._component(
                node, [], nice=self.worker_nice, env=env, cwd=self.data_dir, argv=command
            )
        self.workers[node] = comp.start()
        return comp

    def start_router(self, deployment: str = "disaggregated") -> None:
        """Start the router of ``deployment`` ("disaggregated" or "aggregated")."""
        node = self.router_nodes[deployment]
        args = [
            "router",
            "--host",
            HOST,
            "--port",
            self.router_urls[deployment].rsplit(":", 1)[1],
            "--node-id",
            node,
            "--otlp-endpoint",
            self.otlp_endpoint,
        ]
        if deployment == "aggregated":
            for url in self.both.values():
                args += ["--worker", url]
        else:
            for url in self.prefill.values():
                args += ["--prefill", url]
            for url in self.decode.values():
                args += ["--decode", url]
        name = "router" if node == "router-0" else node
        env = self.node_env.get(name)
        self.routers[deployment] = self._component(name, args, env=env).start()
        if self.router is None:
            self.router = self.routers[deployment]

    def start(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Start every component and wait until each answers its health check.
        Everything already started is stopped if one fails."""
        try:
            self.start_collector()
            for node in [*self.prefill, *self.decode, *self.both]:
                self.start_worker(node)
            assert self.collector is not None
            self.collector.wait_http(f"{self.collector_http}/health")
            if on_ready:
                on_ready("collector")
            timeout_s = 300.0 if self.engine == "vllm" else 90.0
            for node, comp in self.workers.items():
                comp.wait_http(f"{self.worker_url(node)}/health", timeout_s=timeout_s)
                if on_ready:
                    on_ready(node)
            for deployment in self.router_urls:
                self.start_router(deployment)
            for deployment, router in self.routers.items():
                router.wait_http(f"{self.router_urls[deployment]}/health")
                if on_ready:
                    on_ready(router.name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the router and workers first, the collector last, so it drains every
        span they flush on the way out. Idempotent."""
        for comp in reversed(self.components):
            if comp is not self.collector:
                comp.stop()
        if self.collector is not None:
            self.collector.stop(timeout_s=60)

    # -- reading back through the collector -----------------------------------------
    def query(
        self, sql: str, timeout_s: float = 30.0, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Rows as dicts, read from ClickHouse through the collector's query API
        (``params``: ClickHouse query parameters)."""
        resp = httpx.post(
            f"{self.collector_http}/query",
            json={"sql": sql, **({"params": params} if params else {})},
            headers=auth_headers(),
            timeout=timeout_s,
        )
        if resp.status_code != 200:
            raise QueryError(f"{resp.status_code}: {resp.text}")
        body = resp.json()
        cols = body["columns"]
        return [dict(zip(cols, row, strict=True)) for row in body["rows"]]

    def wait_for_rows(self, sql: str, expected: int, timeout_s: float = 30.0) -> int:
        """Poll a ``SELECT count() ...`` until it reaches ``expected``; returns the last count."""
        deadline = time.monotonic() + timeout_s
        count = 0
        while True:
            rows = self.query(sql)
            count = int(next(iter(rows[0].values()))) if rows else 0
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.25)
