"""What every benchmark shares: the figure record, its table and its JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = [
    "Figure",
    "RssSampler",
    "collector_argv",
    "add_common_args",
    "cpu_seconds",
    "emit",
    "median",
    "rss_bytes",
    "table",
]


@dataclass(frozen=True)
class Figure:
    """One measured figure next to its same-run baseline.

    ``ratio`` is ``value / baseline``. ``target`` says in words what ``met`` checks.
    """

    name: str
    value: float
    unit: str
    baseline: float | None
    target: str
    met: bool | None
    baseline_name: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Figure:
        return cls(
            name=str(data["name"]),
            value=float(data["value"]),  # type: ignore[arg-type]
            unit=str(data["unit"]),
            baseline=None if data.get("baseline") is None else float(data["baseline"]),  # type: ignore[arg-type]
            target=str(data["target"]),
            met=None if data.get("met") is None else bool(data["met"]),
            baseline_name=str(data.get("baseline_name", "")),
        )


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(title: str, figures: Sequence[Figure]) -> Table:
    out = Table(title=title, title_justify="left")
    for header, justify in (
        ("figure", "left"),
        ("value", "right"),
        ("unit", "left"),
        ("baseline", "right"),
        ("baseline is", "left"),
        ("ratio", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        out.add_column(header, justify=justify)  # type: ignore[arg-type]
    for f in figures:
        met = "—" if f.met is None else ("[green]yes[/]" if f.met else "[red]no[/]")
        ratio = f.ratio
        out.add_row(
            f.name,
            _fmt(f.value),
            f.unit,
            _fmt(f.baseline),
            f.baseline_name,
            "—" if ratio is None else f"{ratio:.3g}×",
            f.target,
            met,
        )
    return out


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of figures instead of a table"
    )


def emit(title: str, figures: Sequence[Figure], as_json: bool) -> None:
    if as_json:
        json.dump([f.to_json() for f in figures], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        # Wide enough for every column when written to a file or a pipe (rich would
        # wrap to 80 columns there).
        Console(width=None if sys.stdout.isatty() else 220).print(table(title, figures))


def collector_argv(data_dir: Path) -> list[str]:
    """``tokentrace collector`` on ``data_dir`` with every port picked by the OS (they
    are in ``data_dir/collector.json`` once it is ready)."""
    return [
        sys.executable,
        "-m",
        "tokentrace",
        "collector",
        "--data-dir",
        str(data_dir),
        "--otlp-grpc",
        "127.0.0.1:0",
        "--otlp-http",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of ``pid`` (``VmRSS`` now, ``VmHWM`` peak) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    """The median of ``repeats`` runs of ``fn`` (each returns one figure)."""
    return median([fn() for _ in range(repeats)])


class RssSampler:
    """Peak resident memory of a process, total and anonymous (``RssAnon``: without the
    pages of mapped files such as chDB's 200 MB library), sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_anon = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.peak_anon = max(self.peak_anon, rss_bytes(self.pid, "RssAnon"))
            except (OSError, KeyError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak
