"""The reference inference engine: a tiny deterministic torch transformer, a paged KV
cache whose blocks another process can fill, blocking prefill and a continuous-batching
decode loop. Small enough to run many workers on one laptop CPU; vLLM replaces it on GPUs.
"""

from .engine import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    DecodeRequest,
    Engine,
    PrefillResult,
)
from .kv_cache import BlockPool, OutOfBlocksError
from .model import ModelConfig, TinyLM, load_or_create
from .tokenizer import ByteTokenizer

__all__ = [
    "FINISH_ABORT",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "BlockPool",
    "ByteTokenizer",
    "DecodeRequest",
    "Engine",
    "ModelConfig",
    "OutOfBlocksError",
    "PrefillResult",
    "TinyLM",
    "load_or_create",
]
