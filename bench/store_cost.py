"""What the embedded store itself costs for ``bench.ingest``'s rows, without receiving,
logging or decoding them: CPU to insert a token span (or packed token), CPU to rewrite
it once in a merge, and the process's peak memory while it inserts and merges.

Each is measured twice in the same run, in fresh processes: with tokentrace's merge
settings (``schemas.ddl.MERGE_SETTINGS``, set on every table) and with ClickHouse's
defaults (the settings reset), the baseline.

- **insert**: one INSERT per table per block of ``--exports`` exports (one second's
  worth at ``bench.ingest``'s rate by default), materialized views included.
- **one merge rewrite**: merges stopped, ``--blocks`` blocks inserted, then
  ``OPTIMIZE TABLE … FINAL``: each row is read and written once. A store rewrites each
  row once per merge level it passes, more of them the longer it runs.
- **RSS growth**: how far the process's resident memory rises above what it held
  before inserting (the decoded blocks, chDB loaded) while it inserts blocks in a loop
  for ``--seconds`` and ClickHouse merges in the background, sampled every 100 ms.

    .venv/bin/python -m bench.store_cost --mode spans
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from bench._common import Figure, RssSampler, add_common_args, emit, rss_bytes
from bench.ingest import Template, build_template

VARIANTS = ("tokentrace", "defaults")


def _blocks(
    template: Template, exports: int, blocks: int
) -> list[list[tuple[str, Mapping[str, Any]]]]:
    """``blocks`` blocks of ``exports`` decoded copies of ``template`` each, every copy
    with fresh trace ids (as ``bench.ingest``'s sender sends them), as the inserter's
    tables."""
    from tokentrace.collector.ingest.decode import SpanBatch, decode_wire
    from tokentrace.collector.ingest.derive import DerivedRows, derive_rows
    from tokentrace.collector.ingest.pipeline import store_tables

    rng = random.Random(1)
    out = []
    for _ in range(blocks):
        batch, rows = SpanBatch(), DerivedRows()
        for _e in range(exports):
            part = decode_wire(template.fresh(rng))
            batch.extend(part)
            rows.extend(derive_rows(part))
        out.append(store_tables(batch, rows))
    return out


def _one(args: argparse.Namespace) -> dict[str, float]:
    """One variant, in this process: its figures as JSON-able numbers."""
    from tokentrace.collector.store import open_store
    from tokentrace.schemas.ddl import MERGE_SETTINGS, TABLES

    packed = args.mode == "packed"
    main_table = "token_emissions" if packed else "token_spans"
    template = build_template(8, 256, packed)
    tokens_per_block = args.exports * template.token_rows
    blocks = _blocks(template, args.exports, args.blocks)
    with tempfile.TemporaryDirectory(prefix="tt-bench-store-") as tmp:
        store = open_store(f"chdb://{tmp}/clickhouse")
        try:
            if args.one == "defaults":
                for table in TABLES:
                    store.command(
                        f"ALTER TABLE tokentrace.{table} RESET SETTING {', '.join(MERGE_SETTINGS)}"
                    )
            idle = rss_bytes(os.getpid())
            idle_anon = rss_bytes(os.getpid(), "RssAnon")
            sampler = RssSampler(os.getpid())  # peak memory while inserting and merging
            deadline = time.monotonic() + args.seconds
            k = 0
            while time.monotonic() < deadline:
                for table, columns in blocks[k % len(blocks)]:
                    store.insert(table, columns)
                k += 1
            sampler.stop()
            # insert and one rewrite, merges stopped
            store.command(f"TRUNCATE TABLE tokentrace.{main_table}")
            store.command(f"SYSTEM STOP MERGES tokentrace.{main_table}")
            insert_s = 0.0
            for block in blocks:
                for table, columns in block:
                    cpu = time.process_time()
                    store.insert(table, columns)
                    if table == main_table:
                        insert_s += time.process_time() - cpu
            store.command(f"SYSTEM START MERGES tokentrace.{main_table}")
            cpu = time.process_time()
            store.command(f"OPTIMIZE TABLE tokentrace.{main_table} FINAL")
            rewrite_s = time.process_time() - cpu
        finally:
            store.close()
    tokens = len(blocks) * tokens_per_block
    return {
        "insert_us": insert_s / tokens * 1e6,
        "rewrite_us": rewrite_s / tokens * 1e6,
        "idle_rss": idle,
        "growth_rss": sampler.peak - idle,
        "growth_anon": sampler.peak_anon - idle_anon,
    }


def run(args: argparse.Namespace) -> list[Figure]:
    got: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        argv = [sys.executable, "-m", "bench.store_cost", "--one", variant]
        argv += ["--mode", args.mode, "--exports", str(args.exports)]
        argv += ["--blocks", str(args.blocks), "--seconds", str(args.seconds)]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        got[variant] = json.loads(done.stdout)
    ours, base = got["tokentrace"], got["defaults"]
    what = "packed token" if args.mode == "packed" else "token span"
    table = "token_emissions" if args.mode == "packed" else "token_spans"
    mb = 1 << 20
    label = f"store ({args.mode})"
    baseline_name = "ClickHouse's merge defaults"

    def figure(name: str, key: str, unit: str, scale: float = 1.0) -> Figure:
        return Figure(
            f"{label}: {name}",
            ours[key] / scale,
            unit,
            base[key] / scale,
            "(information)",
            None,
            baseline_name,
        )

    return [
        figure(f"CPU to insert a {what} into {table} (views included)", "insert_us", "µs"),
        figure(f"CPU to rewrite a {what} once in a merge", "rewrite_us", "µs"),
        figure("RSS before inserting (the blocks decoded)", "idle_rss", "MB", mb),
        figure(
            f"RSS growth at peak, inserting and merging for {args.seconds:g} s",
            "growth_rss",
            "MB",
            mb,
        ),
        figure("of which anonymous (not chDB's code)", "growth_anon", "MB", mb),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store_cost",
        description="The embedded store's own cost for bench.ingest's rows: CPU per row to "
        "insert and to rewrite once in a merge, and peak memory while inserting; "
        "tokentrace's merge settings against ClickHouse's defaults in the same run.",
    )
    parser.add_argument("--mode", choices=["spans", "packed"], default="spans")
    parser.add_argument(
        "--exports",
        type=int,
        default=86,
        help="exports per block (default 86: one second of bench.ingest's spans mode)",
    )
    parser.add_argument(
        "--blocks", type=int, default=10, help="blocks inserted, then merged once (default 10)"
    )
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="insert loop for the memory peak (default 15)"
    )
    add_common_args(parser)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        json.dump(_one(args), sys.stdout)
        return 0
    emit("the embedded store's own cost", run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
