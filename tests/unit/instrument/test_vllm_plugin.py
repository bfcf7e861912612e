"""The vLLM plugin's parts that need no vLLM server: the instrument wrapper's
environment and the NIXL progress-thread fix (on a real NIXL agent)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tokentrace.instrument.cli import instrumented_env

_AGENT_CPU = """
import os, time
os.environ.setdefault("UCX_TLS", "sm,self,tcp"); os.environ.setdefault("UCX_NET_DEVICES", "lo")
from tokentrace.instrument import vllm_plugin
vllm_plugin.register()
from nixl._api import nixl_agent
agent = nixl_agent("probe")  # vLLM passes its own config; the default takes the same path
time.sleep(0.3)
t0, c0 = time.monotonic(), time.process_time()
time.sleep(1.0)
print(round((time.process_time() - c0) / (time.monotonic() - t0), 2))
"""


def _agent_cpu(progress_thread: str) -> float:
    env = {
        **os.environ,
        "TOKENTRACE_NIXL_PROGRESS_THREAD": progress_thread,
        "TOKENTRACE_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "NIXL_LOG_LEVEL": "WARN",
    }
    out = subprocess.run(
        [sys.executable, "-c", _AGENT_CPU],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_nixl_agent_starts_without_the_spinning_progress_thread() -> None:
    with_thread = _agent_cpu("1")
    without = _agent_cpu("0")
    # NIXL's own progress thread polls with a zero timeout: about a whole core, idle.
    assert with_thread > 0.5, with_thread
    assert without < 0.1, without


def _args(**kw: object) -> argparse.Namespace:
    base = {"otlp_endpoint": None, "node_id": None, "role": None, "nixl_progress_thread": None}
    base["token_spans"] = None
    return argparse.Namespace(**{**base, **kw})


def test_instrument_sets_the_plugin_environment() -> None:
    env = instrumented_env(
        _args(
            otlp_endpoint="http://c:4317",
            node_id="gpu-3",
            role="prefill",
            nixl_progress_thread="on",
            token_spans="spans",
        ),
        {"PATH": "/bin", "VLLM_PLUGINS": "other"},
    )
    assert env["TOKENTRACE_OTLP_ENDPOINT"] == "http://c:4317"
    assert env["TOKENTRACE_NODE_ID"] == "gpu-3"
    assert env["TOKENTRACE_ROLE"] == "prefill"
    assert env["TOKENTRACE_NIXL_PROGRESS_THREAD"] == "1"
    assert env["TOKENTRACE_TOKEN_SPANS"] == "spans"
    assert env["VLLM_PLUGINS"] == "other,tokentrace"  # a restricted list still loads us
    assert env["PATH"] == "/bin"
    # the standard OpenTelemetry variable counts as the endpoint
    env = instrumented_env(_args(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:4317"})
    assert env["TOKENTRACE_OTLP_ENDPOINT"] == "http://o:4317"
    assert "VLLM_PLUGINS" not in env  # unset means every plugin loads
    assert "TOKENTRACE_TOKEN_SPANS" not in env  # the plugin's default


def test_instrument_runs_the_command_with_that_environment() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "instrument",
            "--otlp-endpoint",
            "http://c:4317",
            "--node-id",
            "n7",
            "--",
            sys.executable,
            "-c",
            "import os; e = os.environ; "
            "print(e['TOKENTRACE_OTLP_ENDPOINT'], e['TOKENTRACE_NODE_ID'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["http://c:4317", "n7"]
    missing = subprocess.run(
        [sys.executable, "-m", "tokentrace", "instrument", "--", "no-such-command-xyz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 127 and "not found" in missing.stdout
