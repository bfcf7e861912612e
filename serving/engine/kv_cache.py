"""The paged KV cache: one preallocated CPU tensor cut into fixed-size blocks.

Layout is a wire contract: ``tensor`` is shaped
``[num_blocks, n_layers, 2 (K, V), block_size, n_heads, head_dim]`` and contiguous, so
block ``i`` is the ``block_nbytes`` bytes at ``tensor.data_ptr() + i * block_nbytes``.
The KV-transfer module registers that memory with NIXL and copies whole blocks in and
out by raw address; the tensor is therefore allocated once and never reallocated,
resized or replaced. Token ``t`` of a sequence lives in block ``block_ids[t //
block_size]`` at slot ``t % block_size``; K is stored after rotary embedding.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

import torch

from .model import ModelConfig

__all__ = ["BlockPool", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks for an allocation. Transient: blocks come back as requests
    finish."""

    def __init__(self, requested: int, free: int, total: int) -> None:
        super().__init__(f"KV cache out of blocks: requested {requested}, {free} free of {total}")
        self.requested = requested
        self.free = free
        self.total = total


class BlockPool:
    """Owns the KV-cache tensor and its free list. Thread-safe: allocate/free may be
    called from any thread. Reading and writing block *contents* is not synchronized
    here; whoever holds a block id owns that block's bytes until it frees it.
    """

    def __init__(self, config: ModelConfig, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._config = config
        self._num_blocks = num_blocks
        self._tensor = torch.zeros(
            (num_blocks, config.n_layers, 2, config.block_size, config.n_heads, config.head_dim),
            dtype=config.torch_dtype,
        )
        assert self._tensor.is_contiguous()
        assert self._tensor[0].nbytes == config.block_nbytes
        self._lock = threading.Lock()
        # FIFO reuse, lowest ids first at start: deterministic and easy to read in traces.
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated: set[int] = set()

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def tensor(self) -> torch.Tensor:
        """The cache itself (see module docstring for the layout contract)."""
        return self._tensor

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._config.block_size

    @property
    def block_nbytes(self) -> int:
        return self._config.block_nbytes

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens of KV."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
        return -(-num_tokens // self._config.block_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, now owned by the caller; all or nothing.

        Raises ``OutOfBlocksError`` if fewer than ``n`` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n!r} blocks")
        with self._lock:
            if n > len(self._free):
                raise OutOfBlocksError(n, len(self._free), self._num_blocks)
            ids = [self._free.popleft() for _ in range(n)]
            self._allocated.update(ids)
            return ids

    def free(self, ids: Iterable[int]) -> None:
        """Return blocks to the pool. Raises ``ValueError`` (freeing none of them) if any
        id is not currently allocated — a double free is a bug worth failing loudly on."""
        ids = list(ids)
        with self._lock:
            bad = [i for i in ids if i not in self._allocated]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"freeing blocks that are not allocated (or repeated): {ids}")
            self._allocated.difference_update(ids)
            self._free.extend(ids)
