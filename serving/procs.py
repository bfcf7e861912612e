"""Starting and stopping the stack's components as separate processes.

``demo`` and the integration tests start every component through the ``tokentrace``
command itself, so what they run is exactly what a multi-node deployment runs.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it assigns itself (``bind`` to port 0, the local
    end of an outgoing connection)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago, from below the
    kernel's ephemeral range: a port the kernel handed out would be free again once
    its socket closed, and the kernel may hand it to anyone else (an outgoing
    connection, a vLLM server binding port 0 for its engine core) before our process
    binds it, a minute later when vLLM servers start first. All sockets are held open
    until every port is chosen, so none repeats."""
    lo, _ = ephemeral_range()
    start = 10000 if lo > 20000 else 1024
    rng = random.Random()
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for port in rng.sample(range(start, lo), min(lo - start, 64 * n + 256)):
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            ports.append(port)
        if len(ports) < n:
            raise RuntimeError(f"found only {len(ports)} of {n} free ports on {host}")
        return ports
    finally:
        for s in sockets:
            s.close()


class ComponentError(RuntimeError):
    """A component failed to start or exited early; the message names it and its log."""


class Component:
    """One ``tokentrace <command>`` subprocess with its output in ``log_path``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        nice: int = 0,
        cwd: Path | None = None,
        argv: list[str] | None = None,
    ) -> None:
        """``args`` are a ``tokentrace`` subcommand's; ``argv`` (instead) runs any
        program, e.g. a stock vLLM server."""
        self.name = name
        self.argv = argv
        self.nice = nice
        self.cwd = cwd
        self.args = args
        self.log_path = log_path
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self._env:
            env.update(self._env)
        self.proc = subprocess.Popen(
            self.argv or [sys.executable, "-m", "tokentrace", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            # Own process group (a Ctrl-C in the terminal reaches only the parent) but the
            # same session: with autogroup scheduling a new session would be its own
            # scheduling group, and the niceness below would mean nothing across groups.
            process_group=0,
            preexec_fn=self._lower_priority if self.nice else None,
        )
        log.close()
        return self

    def _lower_priority(self) -> None:
        os.nice(self.nice)  # runs in the child, before exec

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, url: str, timeout_s: float = 90.0) -> None:
        """Block until ``url`` answers 200, or raise ComponentError (with the log tail)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ComponentError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ComponentError(
            f"{self.name} did not answer {url} within {timeout_s:.0f}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``. Idempotent; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Component:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
