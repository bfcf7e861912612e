"""A byte-level tokenizer for the reference engine: nothing to download, nothing to train.

Ids 0..255 are the bytes of the UTF-8 encoding; id 256 is end-of-sequence.

``decode`` maps each byte id to the character with the same code point (latin-1), not
through UTF-8. That is deliberate: every token streams as exactly one character, so a
streamed response is split into as many chunks as there are tokens and one token is one
emission on the wire. The price is that non-ASCII text round-trips as mojibake
(``decode(encode("é")) == "Ã©"``); the reference model emits random bytes anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ByteTokenizer"]

_NUM_BYTES = 256


class ByteTokenizer:
    """Stateless and thread-safe."""

    vocab_size: int = _NUM_BYTES + 1
    eos_id: int = _NUM_BYTES

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; no BOS, no EOS."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """One latin-1 character per byte id; EOS is skipped.

        Raises ``ValueError`` for an id outside ``[0, vocab_size)``.
        """
        out = bytearray()
        for i in ids:
            if 0 <= i < _NUM_BYTES:
                out.append(i)
            elif i != self.eos_id:
                raise ValueError(f"token id {i!r} outside [0, {self.vocab_size})")
        return out.decode("latin-1")
