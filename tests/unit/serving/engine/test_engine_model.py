import json
import threading
from pathlib import Path

import pytest
import torch

from tokentrace.serving.engine import BlockPool, ModelConfig, TinyLM, load_or_create


def test_config_defaults_sizes_and_json_round_trip() -> None:
    c = ModelConfig()
    assert c.head_dim == 32
    assert c.kv_bytes_per_token == 4 * 2 * 4 * 32 * 4
    assert c.block_nbytes == 16 * c.kv_bytes_per_token
    assert ModelConfig.from_json(c.to_json()) == c
    other = ModelConfig(n_layers=2, seed=7, dtype="bfloat16")
    assert ModelConfig.from_json(other.to_json()) == other
    assert other.kv_bytes_per_token == 2 * 2 * 4 * 32 * 2


@pytest.mark.parametrize(
    "kwargs", [{"d_model": 130}, {"n_layers": 0}, {"dtype": "int8"}, {"block_size": -1}]
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_config_rejects_unknown_json_fields() -> None:
    data = json.loads(ModelConfig().to_json())
    data["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_json(json.dumps(data))


def _assert_same_weights(a: TinyLM, b: TinyLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_weights_are_deterministic_and_stored(tmp_path: Path) -> None:
    a = load_or_create(tmp_path / "one")
    b = load_or_create(tmp_path / "two")
    _assert_same_weights(a, b)
    weights = tmp_path / "one" / "tt-tiny" / "weights.pt"
    assert (tmp_path / "one" / "tt-tiny" / "config.json").exists()
    before = weights.stat()
    c = load_or_create(tmp_path / "one")  # loads, does not regenerate
    after = weights.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    _assert_same_weights(a, c)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["tt-tiny"]  # no temp dirs
    different = TinyLM(ModelConfig(seed=1))
    assert not torch.equal(different.lm_head.weight, a.lm_head.weight)


def test_stored_config_must_match_request(tmp_path: Path) -> None:
    load_or_create(tmp_path, "m", ModelConfig(n_layers=2))
    assert load_or_create(tmp_path, "m").config.n_layers == 2
    with pytest.raises(ValueError, match="config"):
        load_or_create(tmp_path, "m", ModelConfig(n_layers=3))


def test_concurrent_creators_all_get_the_same_model(tmp_path: Path) -> None:
    results: list[TinyLM] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(load_or_create(tmp_path, "race", ModelConfig(n_layers=2)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    for r in results[1:]:
        _assert_same_weights(results[0], r)
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


def test_paged_decode_matches_full_forward() -> None:
    config = ModelConfig(n_layers=2, block_size=4)
    model = TinyLM(config)
    ids = torch.tensor([5, 77, 200, 13, 13, 99, 1, 42, 250, 7])
    n = len(ids)
    pool = BlockPool(config, 8)
    blocks = [6, 2, 4]  # out of order on purpose
    with torch.inference_mode():
        full_logits, full_kv = model(ids, all_logits=True)
        for t in range(n):
            width = pool.blocks_for(t + 1)
            table = torch.tensor([blocks[:width]])
            pos = torch.tensor([t])
            logits = model.forward_paged(ids[t : t + 1], pos, pool.tensor, table)
            torch.testing.assert_close(logits[0], full_logits[t], rtol=1e-4, atol=1e-4)
            stored = pool.tensor[blocks[t // 4], :, :, t % 4]
            torch.testing.assert_close(stored, full_kv[:, :, t], rtol=1e-4, atol=1e-4)
