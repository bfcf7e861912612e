"""Where the collector's ingest time goes, stage by stage, in one thread.

Runs the collector's own pipeline stages -- parse and decode, derive, insert into the
embedded ClickHouse -- on ``bench.ingest``'s realistic exports in a loop, and prints the
CPU time per span of each stage. Run it under py-spy for a flame graph:

    .venv/bin/py-spy record --native -o ingest.svg -- .venv/bin/python -m bench.profile_ingest
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench.ingest import build_template
from tokentrace.collector.ingest.decode import decode_wire
from tokentrace.collector.ingest.derive import derive_rows
from tokentrace.collector.ingest.pipeline import store_tables
from tokentrace.collector.store import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_ingest",
        description="CPU per span of each collector ingest stage (parse and decode, derive, "
        "insert), in one thread, on bench.ingest's exports.",
    )
    parser.add_argument("--packed", action="store_true", help="packed token mode")
    parser.add_argument("--exports", type=int, default=40, help="exports to ingest (default 40)")
    parser.add_argument(
        "--per-commit", type=int, default=8, help="exports per insert, as a group commit"
    )
    args = parser.parse_args(argv)
    template = build_template(8, 256, args.packed)
    with tempfile.TemporaryDirectory(prefix="tt-profile-") as tmp:
        store = open_store(f"chdb://{tmp}")
        stages = {"decode": 0.0, "derive": 0.0, "insert": 0.0}
        spans = 0
        for _ in range(0, args.exports, args.per_commit):
            t = time.process_time()
            # as the collector does: the compiled token-span scanner first, if built
            batches = [decode_wire(template.data) for _i in range(args.per_commit)]
            batch = batches[0]
            for other in batches[1:]:
                batch.extend(other)
            stages["decode"] += time.process_time() - t
            t = time.process_time()
            rows = derive_rows(batch)
            stages["derive"] += time.process_time() - t
            t = time.process_time()
            for table, columns in store_tables(batch, rows):
                store.insert(table, columns)
            stages["insert"] += time.process_time() - t
            spans += batch.expanded_spans
        store.close()
    total = sum(stages.values())
    mode = "packed" if args.packed else "one span per token"
    print(f"{mode}: {spans} spans, {total / spans * 1e6:.1f} µs CPU per span in this thread")
    for name, seconds in stages.items():
        print(f"  {name:7s} {seconds / spans * 1e6:6.2f} µs/span  {seconds / total:6.1%}")
    print("(ClickHouse's background merges run on other threads and are not counted here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
