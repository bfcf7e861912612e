import pytest

from tokentrace.serving.engine import ByteTokenizer


def test_encode_is_utf8_bytes_and_eos_is_256() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257
    assert tok.eos_id == 256
    assert tok.encode("hi é") == [104, 105, 32, 0xC3, 0xA9]


def test_decode_is_one_latin1_char_per_token_and_skips_eos() -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("hello")) == "hello"
    ids = tok.encode("é")
    assert tok.decode(ids) == "Ã©"  # byte-wise, documented
    assert all(len(tok.decode([i])) == 1 for i in range(256))
    assert tok.decode([104, tok.eos_id, 105]) == "hi"
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])
