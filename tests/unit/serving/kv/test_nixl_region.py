"""Pure parts of the NIXL KV transfer module: region serialisation, run coalescing and
argument validation that happens before NIXL is touched."""

from __future__ import annotations

import json

import pytest
import torch

from tokentrace.serving.kv import KVRegion, NixlKVEndpoint, TransferResult
from tokentrace.serving.kv.nixl import coalesce_runs


def _region() -> KVRegion:
    return KVRegion(
        agent_name="prefill-0",
        agent_metadata=bytes(range(256)),
        base_addr=0x7F00_0000_1000,
        block_nbytes=32768,
        num_blocks=64,
    )


def test_region_round_trips_through_json() -> None:
    region = _region()
    wire = json.dumps(region.to_dict())
    assert KVRegion.from_dict(json.loads(wire)) == region


def test_region_metadata_is_base64_text() -> None:
    data = _region().to_dict()
    assert isinstance(data["agent_metadata"], str)
    assert data["agent_metadata"].startswith("AAECAw")


@pytest.mark.parametrize(
    "patch",
    [
        {"agent_name": None, "num_blocks": "x"},
        {"agent_metadata": "not base64!"},
        {"block_nbytes": 0},
        {"num_blocks": -1},
    ],
)
def test_region_from_malformed_dict_raises_value_error(patch: dict[str, object]) -> None:
    data = {**_region().to_dict(), **patch}
    with pytest.raises(ValueError):
        KVRegion.from_dict(data)


def test_region_from_dict_missing_key() -> None:
    data = _region().to_dict()
    del data["base_addr"]
    with pytest.raises(ValueError, match="malformed"):
        KVRegion.from_dict(data)


@pytest.mark.parametrize(
    ("remote", "local", "runs"),
    [
        ([3, 4, 5, 9, 17], [0, 1, 2, 3, 4], [(3, 0, 3), (9, 3, 1), (17, 4, 1)]),
        ([3, 4, 5], [10, 12, 13], [(3, 10, 1), (4, 12, 2)]),
        ([5, 4, 3], [0, 1, 2], [(5, 0, 1), (4, 1, 1), (3, 2, 1)]),
        ([7], [7], [(7, 7, 1)]),
        (list(range(100)), list(range(50, 150)), [(0, 50, 100)]),
    ],
)
def test_coalesce_merges_runs_consecutive_on_both_sides(
    remote: list[int], local: list[int], runs: list[tuple[int, int, int]]
) -> None:
    assert coalesce_runs(remote, local) == runs


def test_transfer_result_duration() -> None:
    result = TransferResult(bytes=10, blocks=1, start_ns=1_000, end_ns=2_501_000, backend="x")
    assert result.duration_s == pytest.approx(0.0025)


@pytest.mark.parametrize(
    ("name", "pool", "match"),
    [
        ("", torch.zeros(4, 8), "name"),
        ("ep", torch.zeros(8, 4).t(), "contiguous"),
        ("ep", torch.zeros(0, 8), "non-empty block"),
        ("ep", torch.zeros(4, 0), "non-empty block"),
    ],
)
def test_endpoint_rejects_bad_pool(name: str, pool: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NixlKVEndpoint(name, pool)
