"""docker-compose.yml cannot run here (no Docker engine), so check what can be checked:
every tokentrace command in it parses with tokentrace's own CLI, and the services point
at each other consistently."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tokentrace.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _tokentrace_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for name, svc in compose["services"].items():
        build = svc.get("build") or {}
        if build.get("dockerfile") == "deploy/Dockerfile":
            out[name] = shlex.split(svc["command"])
    return out


def test_tokentrace_commands_parse(compose: dict[str, Any]) -> None:
    services = _tokentrace_services(compose)
    assert set(services) == {"collector", "router"}
    parser = build_parser()
    for argv in services.values():
        parser.parse_args(argv)  # SystemExit on an unknown flag or a bad value
    assert 'ENTRYPOINT ["tokentrace"]' in (ROOT / "deploy/Dockerfile").read_text()


def test_services_point_at_each_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    parser = build_parser()
    collector = parser.parse_args(_tokentrace_services(compose)["collector"])
    router = parser.parse_args(_tokentrace_services(compose)["router"])
    otlp_port = int(collector.otlp_grpc.rsplit(":", 1)[1])
    assert urlparse(collector.clickhouse).hostname in services
    assert collector.forward_otlp == ["grpc://jaeger:4317"]  # Jaeger v2 takes OTLP/gRPC
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    expected_otlp = f"http://collector:{otlp_port}"
    assert router.otlp_endpoint == expected_otlp
    for url in [*router.prefill, *router.decode]:
        assert urlparse(url).hostname in services
    gpus = []
    for name in ("vllm-prefill", "vllm-decode"):
        svc = services[name]
        env = svc["environment"]
        assert env["TOKENTRACE_OTLP_ENDPOINT"] == expected_otlp
        assert env["TOKENTRACE_ROLE"] in name
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == name
        argv = shlex.split(svc["command"])
        kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "NixlConnector"
        device = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert "gpu" in device["capabilities"]
        gpus += device["device_ids"]
    assert len(set(gpus)) == 2  # prefill and decode on different GPUs
    assert "vllm.general_plugins" in (ROOT / "pyproject.toml").read_text()


GRAFANA = ROOT / "deploy/grafana"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((GRAFANA / "dashboards/tokentrace.json").read_text()))


def test_grafana_gets_its_plugin_and_provisioning(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        assert (ROOT / source).is_dir(), f"{source} is mounted but not in the repository"
        mounts[target] = ROOT / source
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = _yaml(provisioning / "dashboards/tokentrace.yaml")["providers"]
    # The provider loads the directory the dashboards are mounted at.
    assert (mounts[provider["options"]["path"]] / "tokentrace.json").is_file()


def test_grafana_data_sources_point_at_the_store_and_the_collector(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    collector = build_parser().parse_args(_tokentrace_services(compose)["collector"])
    sources = {
        s["uid"]: s
        for s in _yaml(GRAFANA / "provisioning/datasources/tokentrace.yaml")["datasources"]
    }
    clickhouse = sources["tokentrace-clickhouse"]
    assert clickhouse["type"] == "grafana-clickhouse-datasource"
    dsn = urlparse(collector.clickhouse)
    assert clickhouse["jsonData"]["host"] == dsn.hostname
    assert clickhouse["jsonData"]["port"] == dsn.port
    assert clickhouse["jsonData"]["protocol"] == dsn.scheme
    assert clickhouse["jsonData"]["defaultDatabase"] == "tokentrace"
    assert clickhouse["jsonData"]["host"] in services
    jaeger = sources["tokentrace-jaeger"]
    assert jaeger["type"] == "jaeger"
    url = urlparse(jaeger["url"])
    # The collector's own Jaeger API (its --http port), not the Jaeger container's.
    assert url.hostname == "collector" and url.port == int(collector.http.rsplit(":", 1)[1])
    assert url.path in ("", "/")
    assert services["grafana"]["environment"]["TOKENTRACE_AUTH_TOKEN"].startswith(
        "${TOKENTRACE_AUTH_TOKEN"
    )
    assert "$TOKENTRACE_AUTH_TOKEN" in jaeger["secureJsonData"]["httpHeaderValue1"]


def test_every_panel_uses_a_provisioned_data_source() -> None:
    sources = {
        s["uid"]: s["type"]
        for s in _yaml(GRAFANA / "provisioning/datasources/tokentrace.yaml")["datasources"]
    }
    dashboard = _dashboard()
    used = [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    for panel in dashboard["panels"]:
        used.append(panel["datasource"])
        used += [t["datasource"] for t in panel["targets"]]
    for ref in used:
        assert sources.get(ref["uid"]) == ref["type"], ref
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # The views of the collector's page, each a panel.
    types = {p["type"] for p in dashboard["panels"]}
    assert {"timeseries", "heatmap", "barchart", "table", "traces"} <= types


def _required(value: str, name: str) -> bool:
    """Whether ``value`` is compose's ``${NAME:?...}``: the stack does not start unset."""
    return value.startswith(f"${{{name}:?")


def test_the_exposed_collector_requires_its_token_and_reads_least_privileged(
    compose: dict[str, Any],
) -> None:
    from tokentrace.collector.ingest.wal import WalConfig
    from tokentrace.collector.service import CollectorConfig
    from tokentrace.runtime.auth import is_loopback_host

    services = compose["services"]
    argv = _tokentrace_services(compose)["collector"]
    collector = build_parser().parse_args(argv)
    env = services["collector"]["environment"]
    hosts = [
        a.rsplit(":", 1)[0] for a in (collector.otlp_grpc, collector.otlp_http, collector.http)
    ]
    assert not any(is_loopback_host(h) for h in hosts)
    assert not collector.allow_unauthenticated and collector.auth_token is None
    assert _required(env["TOKENTRACE_AUTH_TOKEN"], "TOKENTRACE_AUTH_TOKEN")
    with pytest.raises(ValueError, match="without authentication"):
        CollectorConfig(
            dsn=collector.clickhouse, wal=WalConfig("/w"), **_listeners(collector)
        ).validate()
    CollectorConfig(
        dsn=collector.clickhouse, wal=WalConfig("/w"), auth_token="t", **_listeners(collector)
    ).validate()
    # Reads run as the query user the collector creates; Grafana's ClickHouse data
    # source reads as that user too.
    assert collector.create_query_user and collector.query_user == "tokentrace_query"
    assert _required(env["TOKENTRACE_QUERY_PASSWORD"], "TOKENTRACE_QUERY_PASSWORD")
    sources = {
        s["uid"]: s
        for s in _yaml(GRAFANA / "provisioning/datasources/tokentrace.yaml")["datasources"]
    }
    clickhouse = sources["tokentrace-clickhouse"]
    assert clickhouse["jsonData"]["username"] == collector.query_user
    assert clickhouse["secureJsonData"]["password"] == "$TOKENTRACE_QUERY_PASSWORD"
    assert _required(
        services["grafana"]["environment"]["TOKENTRACE_QUERY_PASSWORD"], "TOKENTRACE_QUERY_PASSWORD"
    )
    # ClickHouse: a server that parses statements to JSON, with a password, unpublished.
    server = services["clickhouse"]
    major, minor = (int(x) for x in server["image"].rsplit(":", 1)[1].split(".")[:2])
    assert (major, minor) >= (26, 8)
    assert "ports" not in server
    assert _required(server["environment"]["CLICKHOUSE_PASSWORD"], "CLICKHOUSE_PASSWORD")
    dsn = urlparse(collector.clickhouse)
    assert dsn.username == server["environment"]["CLICKHOUSE_USER"]
    assert dsn.password == "${CLICKHOUSE_PASSWORD}"


def _listeners(args: Any) -> dict[str, Any]:
    from tokentrace.collector.ingest.otlp_grpc import OtlpGrpcConfig
    from tokentrace.collector.ingest.otlp_http import OtlpHttpConfig
    from tokentrace.collector.query.api import ApiConfig
    from tokentrace.collector.service import parse_hostport

    (gh, gp), (hh, hp), (ah, ap) = (
        parse_hostport(a) for a in (args.otlp_grpc, args.otlp_http, args.http)
    )
    return {
        "otlp_grpc": OtlpGrpcConfig(host=gh, port=gp),
        "otlp_http": OtlpHttpConfig(host=hh, port=hp),
        "api": ApiConfig(host=ah, port=ap),
    }


def test_every_exporter_sends_the_collectors_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("vllm-prefill", "vllm-decode"):
        env = services[name]["environment"]
        assert _required(env["TOKENTRACE_AUTH_TOKEN"], "TOKENTRACE_AUTH_TOKEN"), name
    router = services["router"]["environment"]
    headers = router["OTEL_EXPORTER_OTLP_HEADERS"]
    assert headers.startswith("authorization=Bearer%20") and "TOKENTRACE_AUTH_TOKEN:?" in headers
    assert "TOKENTRACE_AUTH_TOKEN" not in router  # that would lock the router's own API
