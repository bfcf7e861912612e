"""NIXL KV transfer between real processes on loopback: a target process (nixl_target.py)
owns a patterned pool; this process reads blocks from it with NixlKVEndpoint."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tokentrace.serving.kv import KVRegion, KVTransferError, NixlKVEndpoint

_TARGET_SCRIPT = Path(__file__).with_name("nixl_target.py")
_NUM_BLOCKS = 640  # 20 MiB: room for one 16 MiB read
_BLOCK_SHAPE = (2, 2, 16, 4, 32)
_BLOCK_NBYTES = 2 * 2 * 16 * 4 * 32 * 4
_STARTUP_TIMEOUT_S = 30.0

pytestmark = pytest.mark.timeout(60)


def _pattern(num_blocks: int) -> torch.Tensor:
    # Same pattern as nixl_target.pattern; duplicated so the test does not import a script.
    per_block = _BLOCK_NBYTES // 4
    return torch.arange(num_blocks * per_block, dtype=torch.float32).reshape(
        num_blocks, *_BLOCK_SHAPE
    )


class _Target:
    """A running nixl_target.py process; stdout lines are collected on a reader thread."""

    def __init__(self, num_blocks: int) -> None:
        self.name = f"prefill-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, NIXL_LOG_LEVEL="WARN")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(_TARGET_SCRIPT),
                "--name",
                self.name,
                "--num-blocks",
                str(num_blocks),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self.notifs: list[bytes] = []
        self._notif_cond = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        line = self._expect("KVREGION", _STARTUP_TIMEOUT_S)
        self.region = KVRegion.from_dict(json.loads(line.split(" ", 1)[1]))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("NOTIF "):
                with self._notif_cond:
                    self.notifs.append(bytes.fromhex(line.split()[1]))
                    self._notif_cond.notify_all()
            else:
                self._lines.put(line.rstrip("\n"))

    def _expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and self._lines.empty():
                raise AssertionError(f"target never printed {prefix!r}")
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def command(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self._expect(f"ACK {command}", 10.0)

    def wait_notifs(self, expected: set[bytes], timeout_s: float = 10.0) -> None:
        with self._notif_cond:
            ok = self._notif_cond.wait_for(lambda: expected <= set(self.notifs), timeout_s)
        assert ok, f"target got {self.notifs}, missing {expected - set(self.notifs)}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def target() -> Iterator[_Target]:
    t = _Target(num_blocks=_NUM_BLOCKS)
    t.command("busy")
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture()
def endpoint() -> Iterator[NixlKVEndpoint]:
    pool = torch.zeros(_NUM_BLOCKS, *_BLOCK_SHAPE, dtype=torch.float32)
    ep = NixlKVEndpoint(f"decode-{uuid.uuid4().hex[:8]}", pool)
    try:
        yield ep
    finally:
        ep.close()


def _local_pool(ep: NixlKVEndpoint) -> torch.Tensor:
    return ep._pool  # the tensor we passed in; reading it back is the point of the test


def test_read_noncontiguous_blocks(target: _Target, endpoint: NixlKVEndpoint) -> None:
    remote_ids = [3, 4, 5, 9, 17]
    local_ids = [40, 41, 42, 0, 63]
    expected = _pattern(_NUM_BLOCKS)

    result = endpoint.read_blocks(target.region, remote_ids, local_ids, b"req-1")

    pool = _local_pool(endpoint)
    for r, loc in zip(remote_ids, local_ids, strict=True):
        assert torch.equal(pool[loc], expected[r]), f"remote {r} -> local {loc}"
    untouched = [i for i in range(_NUM_BLOCKS) if i not in local_ids]
    assert not pool[untouched].any()
    assert result.bytes == len(remote_ids) * _BLOCK_NBYTES
    assert result.blocks == len(remote_ids)
    assert result.end_ns >= result.start_ns > 0
    assert result.backend == "nixl/UCX"
    target.wait_notifs({b"req-1"})


def test_read_16mib_run(target: _Target, endpoint: NixlKVEndpoint) -> None:
    remote_ids = list(range(100, 612))  # 512 blocks x 32 KiB, one descriptor
    local_ids = list(range(0, 512))
    expected = _pattern(_NUM_BLOCKS)

    result = endpoint.read_blocks(target.region, remote_ids, local_ids, b"big")

    assert result.bytes == 16 * 2**20
    assert torch.equal(_local_pool(endpoint)[:512], expected[100:612])
    target.wait_notifs({b"big"})
    print(f"16 MiB read: {(result.end_ns - result.start_ns) / 1e6:.2f} ms")


def test_concurrent_reads_from_threads(target: _Target, endpoint: NixlKVEndpoint) -> None:
    expected = _pattern(_NUM_BLOCKS)
    jobs = [([i * 4, i * 4 + 1, i * 4 + 2], [60 - i * 4, 61 - i * 4, 62 - i * 4]) for i in range(8)]

    def read(job_index: int) -> int:
        remote_ids, local_ids = jobs[job_index]
        notif = f"conc-{job_index}".encode()
        return endpoint.read_blocks(target.region, remote_ids, local_ids, notif).bytes

    with ThreadPoolExecutor(max_workers=8) as pool:
        nbytes = list(pool.map(read, range(len(jobs))))

    assert nbytes == [3 * _BLOCK_NBYTES] * len(jobs)
    local = _local_pool(endpoint)
    for remote_ids, local_ids in jobs:
        for r, loc in zip(remote_ids, local_ids, strict=True):
            assert torch.equal(local[loc], expected[r])
    target.wait_notifs({f"conc-{i}".encode() for i in range(len(jobs))})


def test_bad_arguments_rejected(target: _Target, endpoint: NixlKVEndpoint) -> None:
    with pytest.raises(ValueError, match="out of range"):
        endpoint.read_blocks(target.region, [_NUM_BLOCKS], [0], b"x")
    with pytest.raises(ValueError, match="local"):
        endpoint.read_blocks(target.region, [0], [-1], b"x")
    with pytest.raises(ValueError, match="remote block ids"):
        endpoint.read_blocks(target.region, [0, 1], [0], b"x")
    with pytest.raises(ValueError, match="non-contiguous|contiguous"):
        NixlKVEndpoint("bad", torch.zeros(4, 8).t())


def test_read_after_close_raises(target: _Target) -> None:
    ep = NixlKVEndpoint(f"decode-{uuid.uuid4().hex[:8]}", torch.zeros(_NUM_BLOCKS, *_BLOCK_SHAPE))
    ep.close()
    ep.close()  # idempotent
    with pytest.raises(KVTransferError, match="closed"):
        ep.read_blocks(target.region, [0], [0], b"x")


@pytest.mark.parametrize("connect_first", [True, False], ids=["connected", "never-connected"])
def test_read_from_exited_target_raises(endpoint: NixlKVEndpoint, connect_first: bool) -> None:
    dead = _Target(num_blocks=8)
    try:
        dead.command("busy")
        if connect_first:
            endpoint.read_blocks(dead.region, [1], [1], b"warm")
    finally:
        dead.proc.kill()
        dead.proc.wait()
    timeout_s = 5.0
    start = time.monotonic()
    with pytest.raises(KVTransferError):
        endpoint.read_blocks(dead.region, [2, 3], [2, 3], b"dead", timeout_s=timeout_s)
    elapsed_s = time.monotonic() - start
    print(f"read from exited target failed after {elapsed_s * 1e3:.1f} ms")
    assert elapsed_s < timeout_s + 1.0


def test_idle_target_uses_little_cpu(target: _Target) -> None:
    target.command("idle")
    try:
        time.sleep(0.3)
        cpu_before, wall_before = target.cpu_seconds(), time.monotonic()
        time.sleep(2.0)
        cpu_share = (target.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    finally:
        target.command("busy")
    print(f"idle target CPU: {cpu_share:.1%} of one core")
    assert cpu_share < 0.05
