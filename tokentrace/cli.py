"""The ``tokentrace`` command: hands each subcommand to the package that owns it.

Each owning package has a ``cli`` module with ``register(subparsers)``, which adds its
subcommands and sets ``func`` on them. Registration imports nothing heavy, so
``tokentrace --help`` is quick; a subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tokentrace import __version__


def build_parser() -> argparse.ArgumentParser:
    from tokentrace.collector import cli as collector_cli
    from tokentrace.instrument import cli as instrument_cli
    from tokentrace.serving import cli as serving_cli

    parser = argparse.ArgumentParser(
        prog="tokentrace",
        description=(
            "OpenTelemetry tracing for disaggregated LLM serving: every token emission and "
            "KV-cache transfer a span; TTFT, ITL and KV transfer time per node in ClickHouse."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tokentrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serving_cli.register(sub)
    collector_cli.register(sub)
    instrument_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
