"""``python -m tokentrace.collector collector|query ...``: the collector's commands alone.

The same subcommands as ``tokentrace collector`` / ``tokentrace query``, without loading
the other packages' commands.
"""

from __future__ import annotations

import argparse
import sys

from .cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokentrace.collector")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
