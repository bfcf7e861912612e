"""Where tokentrace keeps its files: one data directory for every component.

``--data-dir`` means the same for ``demo``, ``collector``, ``worker`` and ``query``.
Default: ``$TOKENTRACE_DATA_DIR`` if set, else ``$XDG_DATA_HOME/tokentrace``
(``~/.local/share/tokentrace``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "TOKENTRACE_DATA_DIR"


def default_data_dir() -> Path:
    """The documented default data directory (not created here)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "tokentrace"


def clickhouse_dir(data_dir: Path) -> Path:
    """The embedded ClickHouse (chDB) store; DSN ``chdb://<this path>``."""
    return data_dir / "clickhouse"


def default_dsn(data_dir: Path) -> str:
    return f"chdb://{clickhouse_dir(data_dir).resolve()}"


def wal_dir(data_dir: Path) -> Path:
    """The collector's write-ahead log: accepted spans not yet known to be in ClickHouse."""
    return data_dir / "wal"


def collector_file(data_dir: Path) -> Path:
    """JSON written by a running collector: pid and its endpoints; removed on exit."""
    return data_dir / "collector.json"


def models_dir(data_dir: Path) -> Path:
    """Locally generated model weights (nothing is downloaded)."""
    return data_dir / "models"
