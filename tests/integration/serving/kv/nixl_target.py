"""Prefill-side stand-in for the NIXL transfer tests: run as a separate process.

Creates a block pool filled with ``pattern(num_blocks)``, publishes its KVRegion as one
``KVREGION <json>`` stdout line, runs the notification loop and prints ``NOTIF <hex>`` for
each notification. Reads commands from stdin: ``busy`` / ``idle`` set what the loop's
``busy()`` reports; ``quit`` (or EOF) closes the endpoint and exits.
Other stdout lines (NIXL logs to stdout) are to be ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import torch

from tokentrace.serving.kv import NixlKVEndpoint

# 2 layers x (K, V) x 16 tokens x 4 heads x 32 dims, float32: 32 KiB per block.
BLOCK_SHAPE = (2, 2, 16, 4, 32)


def pattern(num_blocks: int) -> torch.Tensor:
    """Every element distinct and exact in float32 for up to 2048 blocks."""
    per_block = 1
    for dim in BLOCK_SHAPE:
        per_block *= dim
    flat = torch.arange(num_blocks * per_block, dtype=torch.float32)
    return flat.reshape(num_blocks, *BLOCK_SHAPE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--num-blocks", type=int, default=64)
    args = parser.parse_args()

    pool = pattern(args.num_blocks)
    endpoint = NixlKVEndpoint(args.name, pool)
    busy = threading.Event()
    out_lock = threading.Lock()

    def on_notif(msg: bytes) -> None:
        with out_lock:
            print("NOTIF", msg.hex(), flush=True)

    endpoint.start_notification_loop(on_notif, busy.is_set)
    with out_lock:
        print("KVREGION", json.dumps(endpoint.region().to_dict()), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "busy":
            busy.set()
        elif command == "idle":
            busy.clear()
        elif command == "quit":
            break
        with out_lock:
            print("ACK", command, flush=True)
    endpoint.close()


if __name__ == "__main__":
    main()
