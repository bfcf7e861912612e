import threading

import pytest

from tokentrace.serving.engine import BlockPool, ModelConfig, OutOfBlocksError


def test_layout_is_contiguous_blocks_of_block_nbytes() -> None:
    c = ModelConfig()
    pool = BlockPool(c, 8)
    t = pool.tensor
    assert tuple(t.shape) == (8, c.n_layers, 2, c.block_size, c.n_heads, c.head_dim)
    assert t.is_contiguous()
    assert t[0].nbytes == c.block_nbytes == pool.block_nbytes
    assert t[3].data_ptr() == t.data_ptr() + 3 * c.block_nbytes


def test_allocate_free_and_out_of_blocks() -> None:
    pool = BlockPool(ModelConfig(), 4)
    assert pool.blocks_for(0) == 0
    assert pool.blocks_for(16) == 1
    assert pool.blocks_for(17) == 2
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(OutOfBlocksError, match="requested 2, 1 free of 4"):
        pool.allocate(2)
    assert pool.num_free == 1  # all or nothing
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free([a[0]])  # double free
    with pytest.raises(ValueError):
        BlockPool(ModelConfig(), 0)


def test_concurrent_allocate_free_never_hands_out_a_block_twice() -> None:
    pool = BlockPool(ModelConfig(n_layers=1), 64)
    held: set[int] = set()
    held_lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(300):
                try:
                    ids = pool.allocate(5)
                except OutOfBlocksError:
                    continue
                with held_lock:
                    assert not held & set(ids), "block handed out twice"
                    held.update(ids)
                with held_lock:
                    held.difference_update(ids)
                pool.free(ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.num_free == 64
