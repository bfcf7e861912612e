"""The reference model: a small decoder-only transformer with deterministic random weights.

Architecture (Llama-shaped, kept standard so the KV cache looks like a real one):
token embedding → ``n_layers`` × [RMSNorm → causal multi-head attention with rotary
positions (rotate-half convention) → residual; RMSNorm → GELU MLP → residual] → RMSNorm
→ untied LM head. No biases.

Per layer the attention keys and values are cached *after* rotary is applied to K, so a
cached key never needs to be touched again; the cache layout per token is
``[n_layers, 2 (K, V), n_heads, head_dim]``.

Weights come from ``torch.Generator().manual_seed(config.seed)``, so every process that
asks for the same config gets bit-identical weights, whether it generated or loaded them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "TinyLM", "load_or_create"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "weights.pt"
_ROPE_THETA = 10000.0
_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model and of its KV cache. Immutable; validated on construction."""

    vocab_size: int = 257
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    max_seq_len: int = 4096
    block_size: int = 16
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in (
            "vocab_size",
            "n_layers",
            "d_model",
            "n_heads",
            "d_ff",
            "max_seq_len",
            "block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"ModelConfig.seed must be an int, got {self.seed!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} not divisible by n_heads={self.n_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig head_dim={self.head_dim} must be even (rotary)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r} not one of {sorted(_DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers."""
        return self.n_layers * 2 * self.n_heads * self.head_dim * self.itemsize

    @property
    def block_nbytes(self) -> int:
        """Bytes of one KV-cache block (``block_size`` tokens)."""
        return self.block_size * self.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Raises ``ValueError`` on unknown keys or bad values."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, _NORM_EPS)


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attn_norm = _RMSNorm(d)
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.mlp_norm = _RMSNorm(d)
        self.w_in = nn.Linear(d, config.d_ff, bias=False)
        self.w_out = nn.Linear(config.d_ff, d, bias=False)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. ``x``: [..., head_dim]; cos/sin broadcastable to
    [..., head_dim // 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TinyLM(nn.Module):
    """The model. Weights are never mutated after construction, so one instance may be
    shared by several engines; each call is plain CPU compute on the calling thread.
    Call under ``torch.inference_mode()``.
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        blocks = [_Block(config) for _ in range(config.n_layers)]
        self.layers = nn.ModuleList(blocks)
        self._blocks: list[_Block] = blocks  # same modules, typed for iteration
        self.final_norm = _RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        half = config.head_dim // 2
        inv_freq = 1.0 / (_ROPE_THETA ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
        # Rotary tables are derived, not weights: keep them out of the state dict.
        self.register_buffer("rope_cos", angles.cos().to(config.torch_dtype), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(config.torch_dtype), persistent=False)
        self._init_weights()
        self.to(config.torch_dtype)
        self.eval()
        self.requires_grad_(False)

    def _init_weights(self) -> None:
        """Deterministic from ``config.seed``: parameters are drawn in ``named_parameters``
        order from one generator, in float32, independent of torch's global RNG."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        # Embedding rows O(1) so the residual stream starts well spread; projections
        # 1.5/sqrt(fan_in) so attention is peaked enough to mix context in; residual
        # output projections scaled down by depth as in GPT-2; LM head std such that
        # logits have std ≈ 3. Picked by trying a few: random-weight greedy output then
        # wanders over 30-50 distinct bytes per 100 tokens instead of locking onto one.
        gain = 1.5
        depth = math.sqrt(2 * c.n_layers)
        stds = {
            "tok_emb.weight": 1.0,
            "wqkv.weight": gain / math.sqrt(c.d_model),
            "wo.weight": gain / math.sqrt(c.d_model) / depth,
            "w_in.weight": gain / math.sqrt(c.d_model),
            "w_out.weight": gain / math.sqrt(c.d_ff) / depth,
            "lm_head.weight": 3.0 / math.sqrt(c.d_model),
        }
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                key = name.split(".", 2)[2] if name.startswith("layers.") else name
                std = stds[key]
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, std, generator=gen)
                param.copy_(values)

    def _qkv(
        self, layer: _Block, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h``: [N, d_model]; ``positions``: [N]. Returns q, k (rotated), v, each
        [N, n_heads, head_dim]."""
        c = self.config
        qkv = layer.wqkv(layer.attn_norm(h)).view(h.shape[0], 3, c.n_heads, c.head_dim)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        q = _rotate(qkv[:, 0], cos, sin)
        k = _rotate(qkv[:, 1], cos, sin)
        return q, k, qkv[:, 2]

    def _mlp(self, layer: _Block, h: torch.Tensor) -> torch.Tensor:
        return layer.w_out(F.gelu(layer.w_in(layer.mlp_norm(h))))

    def forward(
        self, token_ids: torch.Tensor, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal forward over one sequence starting at position 0 (prefill).

        ``token_ids``: int64 [T]. Returns ``(logits, kv)``: logits [vocab] for the last
        position (or [T, vocab] with ``all_logits``), and kv
        [n_layers, 2, T, n_heads, head_dim] — the cache entries for every position.
        """
        c = self.config
        n = token_ids.shape[0]
        positions = torch.arange(n)
        h = self.tok_emb(token_ids)
        kv = torch.empty((c.n_layers, 2, n, c.n_heads, c.head_dim), dtype=h.dtype)
        for i, layer in enumerate(self._blocks):
            q, k, v = self._qkv(layer, h, positions)
            kv[i, 0] = k
            kv[i, 1] = v
            # [1, H, T, D] for SDPA.
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
            )
            h = h + layer.wo(attn.squeeze(0).transpose(0, 1).reshape(n, c.d_model))
            h = h + self._mlp(layer, h)
        if not all_logits:
            h = h[-1]
        return self.lm_head(self.final_norm(h)), kv

    def forward_paged(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        block_table: torch.Tensor,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token for each of B sequences against a paged KV cache (decode).

        ``token_ids``, ``positions``: int64 [B]. ``cache``: the block pool tensor
        [num_blocks, n_layers, 2, block_size, n_heads, head_dim]. ``block_table``: int64
        [B, W]; row b lists sequence b's blocks in order, covering positions
        ``0 .. positions[b]`` (pad the rest of the row with any valid block id: it is
        masked out). Sequence b attends to cached positions ``< positions[b]`` and to
        itself; its new K/V are written into the cache at ``positions[b]`` layer by
        layer. Returns logits [B, vocab].

        ``scratch``: optional 1-D tensor of ``cache.dtype`` with at least
        ``2 * B * W * block_size * n_heads * head_dim`` elements, owned by the caller and
        reused across calls to hold the gathered K/V. Gathering into fresh multi-MB
        tensors costs more in page faults than in copying.
        """
        c = self.config
        b, width = block_table.shape
        bs = c.block_size
        # The cache viewed two ways: chunks [num_blocks * n_layers * 2, bs, H, D] (one
        # chunk is one block's K or V of one layer, contiguous: gathered whole) and rows
        # [num_blocks * n_layers * 2 * bs, H, D] (one token's K or V of one layer).
        chunks = cache.view(-1, bs, c.n_heads, c.head_dim)
        rows = cache.view(-1, c.n_heads, c.head_dim)
        offsets = torch.arange(width * bs)
        table_chunks = (block_table * (c.n_layers * 2)).view(-1)  # [B * W], K of layer 0
        new_block = block_table.gather(1, (positions // bs).unsqueeze(1)).squeeze(1)
        new_rows = new_block * (c.n_layers * 2 * bs) + positions % bs  # K of layer 0
        mask = (offsets.unsqueeze(0) <= positions.unsqueeze(1))[:, None, None, :]
        gathered_shape = (b * width, bs, c.n_heads, c.head_dim)
        n = math.prod(gathered_shape)
        if scratch is None or scratch.numel() < 2 * n:
            scratch = torch.empty(2 * n, dtype=cache.dtype)
        keys = scratch[:n].view(gathered_shape)
        values = scratch[n : 2 * n].view(gathered_shape)
        h = self.tok_emb(token_ids)
        for i, layer in enumerate(self._blocks):
            q, k, v = self._qkv(layer, h, positions)
            rows.index_copy_(0, new_rows + (2 * i) * bs, k)
            rows.index_copy_(0, new_rows + (2 * i + 1) * bs, v)
            torch.index_select(chunks, 0, table_chunks + 2 * i, out=keys)
            torch.index_select(chunks, 0, table_chunks + 2 * i + 1, out=values)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                keys.view(b, width * bs, c.n_heads, c.head_dim).transpose(1, 2),
                values.view(b, width * bs, c.n_heads, c.head_dim).transpose(1, 2),
                attn_mask=mask,
            )  # [B, H, 1, D]
            h = h + layer.wo(attn.reshape(b, c.d_model))
            h = h + self._mlp(layer, h)
        return self.lm_head(self.final_norm(h))


def _save(model: TinyLM, directory: Path) -> None:
    (directory / _CONFIG_FILE).write_text(model.config.to_json() + "\n")
    torch.save(model.state_dict(), directory / _WEIGHTS_FILE)


def _load(directory: Path) -> TinyLM:
    config = ModelConfig.from_json((directory / _CONFIG_FILE).read_text())
    model = TinyLM(config)  # initializing is cheap at this size; weights overwritten below
    state = torch.load(directory / _WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def load_or_create(
    models_dir: Path, name: str = "tt-tiny", config: ModelConfig | None = None
) -> TinyLM:
    """The model stored at ``models_dir/name/``; generated and stored first if absent.

    Safe when several processes call it at once: each writes a private temp directory
    and renames it into place; a loser of the race discards its copy and loads the
    winner's, which is identical because weights depend only on the config.
    Blocking (file I/O). Raises ``ValueError`` if ``config`` is given and differs from
    the stored one.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad model name {name!r}")
    models_dir = Path(models_dir)
    final = models_dir / name
    if not (final / _CONFIG_FILE).exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        model = TinyLM(config if config is not None else ModelConfig())
        tmp = models_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _save(model, tmp)
            try:
                os.rename(tmp, final)
                return model
            except OSError:
                if not (final / _CONFIG_FILE).exists():
                    raise
                # Lost the race to another process; its weights are the same as ours.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load(final)
    if config is not None and loaded.config != config:
        raise ValueError(
            f"model {name!r} in {models_dir} has config {loaded.config}, requested {config}"
        )
    return loaded
