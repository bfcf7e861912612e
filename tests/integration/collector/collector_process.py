"""Starting ``tokentrace collector`` as a real subprocess for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest


def start_collector(
    data_dir: Path,
    *extra: str,
    stderr: int | IO[str] = subprocess.PIPE,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], dict[str, Any], str]:
    """A collector on loopback ports the OS picks (unless ``extra`` names them), once it
    printed its ready line; returns the process, its collector.json and that line.
    ``prefix`` runs it under another command (which must exec it). Fails the test if it
    does not start."""
    # --clickhouse excludes --data-dir: the data directory (collector.json, the log)
    # then comes from the environment.
    env = {**os.environ, "TOKENTRACE_DATA_DIR": str(data_dir)}
    store_args = () if "--clickhouse" in extra else ("--data-dir", str(data_dir))
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "tokentrace",
            "collector",
            *store_args,
            "--otlp-grpc",
            "127.0.0.1:0",
            "--otlp-http",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()))
    reader.start()
    reader.join(timeout=30)
    if not line or not line[0].startswith("tokentrace collector ready"):
        proc.kill()
        err = proc.stderr.read() if proc.stderr is not None else "(see its stderr file)"
        pytest.fail(f"collector did not become ready: {line} {err}")
    return proc, json.loads((data_dir / "collector.json").read_text()), line[0]


@dataclass
class Running:
    """A collector process started by :func:`running_collector`."""

    proc: subprocess.Popen[str]
    data_dir: Path
    info: dict[str, Any]
    ready: str  # the line it printed once listening

    @property
    def api(self) -> str:
        return f"http://{self.info['http']}"

    @property
    def otlp_http(self) -> str:
        return f"http://{self.info['otlp_http']}/v1/traces"

    @property
    def otlp_grpc(self) -> str:
        return str(self.info["otlp_grpc"])


@contextmanager
def running_collector(data_dir: Path, *extra: str) -> Iterator[Running]:
    """A collector for the block (a module fixture's lifetime); SIGTERM'd after it."""
    proc, info, ready = start_collector(data_dir, *extra)
    try:
        yield Running(proc, data_dir, info, ready)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
