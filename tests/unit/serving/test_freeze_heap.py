"""Routers and workers freeze their start-up heap before serving, so a full garbage
collection walks only what serving allocated since: not the imports, the app and the
model (a pause the client sees and the stamps do not)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
import tokentrace.serving.worker  # what a worker imports before it serves
from tokentrace.serving.serve import freeze_startup_heap
before = len(gc.get_objects())
freeze_startup_heap()
print(gc.get_freeze_count(), before, len(gc.get_objects()))
"""


def test_the_start_up_heap_leaves_the_collectors_reach() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    frozen, tracked_before, tracked_after = map(int, out)
    assert frozen > 10_000  # the worker's imports alone are tens of thousands of objects
    assert tracked_after < tracked_before // 10
