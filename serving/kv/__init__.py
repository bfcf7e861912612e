"""KV-cache block transfer between prefill and decode workers (NIXL, pull mode)."""

from .nixl import KVRegion, KVTransferError, NixlKVEndpoint, TransferResult

__all__ = ["KVRegion", "KVTransferError", "NixlKVEndpoint", "TransferResult"]
