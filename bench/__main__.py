"""``python -m bench`` (``make bench``): every benchmark in turn, one summary table.

Each benchmark runs in its own process (``python -m bench.<name> --json``) so none
inherits another's threads, caches or memory; their figures are gathered into one table:
figure, baseline, ratio, target, met or not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from rich.console import Console

from bench._common import Figure, emit

BENCHMARKS: dict[str, list[str]] = {
    "hotpath": [],
    "export": [],
    "engine": [],
    "ingest": ["--seconds", "30"],
    "query": [],
    "agreement": [],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run every tokentrace benchmark (hotpath, export, engine, ingest, query, "
        "agreement) and print one summary table of figures next to their same-run baselines.",
    )
    parser.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), help="run just these (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--save", metavar="PATH", help="also write the figures to PATH as a JSON list"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    figures: list[Figure] = []
    failed: list[str] = []
    for name, extra in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, "-m", f"bench.{name}", "--json", *extra]
        console.print(f"[bold]{' '.join(command[1:])}[/] …")
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        took = time.monotonic() - began
        if done.returncode != 0:
            failed.append(name)
            console.print(f"[red]bench.{name} failed ({took:.0f} s):[/]\n{done.stderr[-3000:]}")
            continue
        got = [Figure.from_json(item) for item in json.loads(done.stdout)]
        console.print(f"  {len(got)} figures in {took:.0f} s")
        figures.extend(got)
    if args.save:
        with open(args.save, "w") as out:
            json.dump([f.to_json() for f in figures], out, indent=1)
    emit("tokentrace benchmarks (make bench)", figures, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
