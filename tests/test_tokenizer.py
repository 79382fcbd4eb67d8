"""Tokenizer tests against the official Qwen vocabulary, plus small vocabularies built here."""

import base64
import math
import unicodedata

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import PAT_STR, SPECIAL_TOKENS, StreamDecoder, Tokenizer

REFERENCE_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

MIXED_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, we've DONE it, you'D agree",
    "你好，世界！今天天气怎么样？",
    "通义千问是阿里云研发的大语言模型。",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "1234567890 and 3.14159, 1e-9",
    "emoji 🦜🦩 and flags 🇨🇳🇺🇸 👩‍👩‍👧",
    "tabs\t\tand   spaces    \n\n\n  trailing   ",
    "\r\n\r\nwindows line endings\r\n",
    "mixed 中文 English 日本語 한국어 العربية",
    "Ünïcödé çàfé naïve résumé",
    "<|im_start|>user\nhi<|im_end|>",
    "   leading spaces",
    "a" * 50,
    "!!!???...---",
    "https://example.com/path?q=1&r=2#frag",
    "Ωμέγα Привет мир",
    "x²+y²=z² ½ ⅓ ٣",
]


# --- An independent reference: regex pre-tokenization + greedy lowest-rank BPE in pure Python.


def read_ranks(path) -> dict[bytes, int]:
    with open(path) as f:
        return {
            base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())
        }


def reference_bpe(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] == math.inf:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


def reference_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    text = unicodedata.normalize("NFC", text)
    return [i for piece in regex.findall(REFERENCE_PAT, text) for i in reference_bpe(ranks, piece.encode())]


@pytest.fixture(scope="module")
def official_ranks(official_tokenizer) -> dict[bytes, int]:
    return read_ranks(official_tokenizer.path)


def write_vocab(path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))


def tiny_tokens() -> list[bytes]:
    return [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello"]


# --- Official vocabulary: known ids.


def test_constants():
    assert PAT_STR == REFERENCE_PAT
    assert len(SPECIAL_TOKENS) == 208
    assert SPECIAL_TOKENS[:4] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>")
    assert SPECIAL_TOKENS[-1] == "<|extra_204|>"


def test_known_ids(official_tokenizer):
    tok = official_tokenizer
    assert tok.encode("\n") == [198]
    assert tok.encode("user") == [872]
    assert tok.encode("assistant") == [77091]
    assert tok.encode("system") == [8948]
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    assert tok.encode("你好") == [108386]


def test_special_ids_and_sizes(official_tokenizer):
    tok = official_tokenizer
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (151643, 151644, 151645, 151643)
    assert tok.special_tokens["<|extra_0|>"] == 151646
    assert tok.special_tokens["<|extra_204|>"] == 151850
    assert len(tok.special_tokens) == 208
    assert tok.n_bpe == 151643
    assert tok.vocab_size == 151851
    assert len(tok) == 151851
    assert tok.path.name == "qwen.tiktoken"
    assert "151851" in repr(tok)


# --- Special tokens in text.


def test_special_text_is_plain_by_default(official_tokenizer):
    tok = official_tokenizer
    text = "<|im_start|>system"
    ids = tok.encode(text)
    assert 151644 not in ids
    assert all(i < tok.n_bpe for i in ids)
    assert tok.decode(ids) == text


def test_allowed_special(official_tokenizer):
    tok = official_tokenizer
    assert tok.encode("<|im_start|>system", allowed_special="all") == [151644, 8948]
    ids = tok.encode("<|im_start|>a<|im_end|>", allowed_special={"<|im_end|>"})
    assert ids[-1] == 151645
    assert 151644 not in ids
    assert tok.decode(ids) == "<|im_start|>a<|im_end|>"


def test_disallowed_special_raises_qwenkit_error(official_tokenizer):
    with pytest.raises(QwenkitError, match="im_end"):
        official_tokenizer.encode("a<|im_end|>", disallowed_special="all")
    with pytest.raises(QwenkitError, match="endoftext"):
        official_tokenizer.encode_batch(["fine", "x<|endoftext|>"], disallowed_special={"<|endoftext|>"})
    assert (
        official_tokenizer.encode("a<|im_end|>", allowed_special="all", disallowed_special="all")[-1]
        == 151645
    )


def test_nfc(official_tokenizer):
    assert official_tokenizer.encode("e\u0301") == official_tokenizer.encode("\u00e9")
    assert official_tokenizer.encode_batch(["cafe\u0301"]) == [official_tokenizer.encode("caf\u00e9")]


# --- Cross-check against the pure-Python reference.


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_matches_reference_bpe(official_tokenizer, official_ranks, text):
    assert official_tokenizer.encode(text) == reference_encode(official_ranks, text)


# --- Round trips.

surrogate_free_text = st.text(st.characters(blacklist_categories=("Cs",)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=surrogate_free_text)
def test_round_trip(official_tokenizer, text):
    assert official_tokenizer.decode(official_tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(surrogate_free_text, max_size=8))
def test_encode_batch_matches_encode(official_tokenizer, texts):
    tok = official_tokenizer
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allowed_special="all") == [
        tok.encode(t, allowed_special="all") for t in texts
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_encode_never_raises_even_with_surrogates(official_tokenizer, text):
    ids = official_tokenizer.encode(text)
    assert isinstance(official_tokenizer.decode(ids), str)


# --- Decoding.


def test_decode_partial_utf8(official_tokenizer):
    tok = official_tokenizer
    ids = tok.encode("🦜")
    assert len(ids) > 1
    assert tok.decode(ids) == "🦜"
    assert "\ufffd" in tok.decode(ids[:1])
    assert "\ufffd" in tok.decode(ids[1:])
    # Any vocabulary token that is not valid UTF-8 on its own decodes with U+FFFD.
    broken = next(i for i in range(tok.n_bpe) if not _is_utf8(tok.token_bytes(i)))
    assert "\ufffd" in tok.decode([broken])
    with pytest.raises(UnicodeDecodeError):
        tok.decode([broken], errors="strict")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_decode_skip_special_tokens(official_tokenizer):
    tok = official_tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|extra_7|>", allowed_special="all")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|extra_7|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_decode_accepts_tensors_and_arrays(official_tokenizer):
    torch = pytest.importorskip("torch")
    tok = official_tokenizer
    ids = tok.encode("你好 user", allowed_special="all")
    assert tok.decode(np.array(ids)) == "你好 user"
    assert tok.decode(torch.tensor(ids)) == "你好 user"
    assert tok.decode([np.int64(i) for i in ids]) == "你好 user"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [[151851], [5, -1], [10**9]])
def test_decode_out_of_range(official_tokenizer, bad):
    with pytest.raises(QwenkitError, match=str(next(i for i in bad if not 0 <= i < 151851))):
        official_tokenizer.decode(bad)


@pytest.mark.parametrize("bad", [[1.5], np.zeros((2, 2), dtype=np.int64), np.int64(3)])
def test_decode_rejects_non_id_sequences(official_tokenizer, bad):
    with pytest.raises(QwenkitError, match="1-D"):
        official_tokenizer.decode(bad)


def test_token_bytes(official_tokenizer):
    tok = official_tokenizer
    assert tok.token_bytes(198) == b"\n"
    assert tok.token_bytes(108386) == "你好".encode()
    assert tok.token_bytes(151644) == b"<|im_start|>"
    with pytest.raises(QwenkitError, match="151851"):
        tok.token_bytes(151851)


# --- Streaming.


def test_stream_decoder_never_emits_half_characters(official_tokenizer):
    tok = official_tokenizer
    text = "流式输出 🦜🦩 emoji 👩‍👩‍👧 and 鱻𠀀 rare chars, ok."
    ids = tok.encode(text)
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)  # the test really splits characters
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_flush_and_specials(official_tokenizer):
    tok = official_tokenizer
    ids = tok.encode("🦜")
    stream = StreamDecoder(tok)
    assert stream.push(ids[0]) == ""
    assert stream.flush() == "\ufffd"
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert stream.push(tok.im_start_id) == ""
    assert stream.push(tok.encode("hi")[0]) == "hi"
    with pytest.raises(QwenkitError):
        stream.push(-1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 151850), max_size=30), skip=st.booleans())
def test_stream_decoder_equals_decode(official_tokenizer, ids, skip):
    stream = StreamDecoder(official_tokenizer, skip_special_tokens=skip)
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == official_tokenizer.decode(ids, skip_special_tokens=skip)


# --- Loading, and vocabularies other than the official one.


def test_missing_file(tmp_path):
    with pytest.raises(QwenkitError, match="qwen.tiktoken"):
        Tokenizer.from_file(tmp_path / "nope.tiktoken")


def test_directory_without_vocab(tmp_path):
    with pytest.raises(QwenkitError, match="qwen.tiktoken") as info:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(info.value)


def test_directory_with_vocab_and_small_vocabulary(tmp_path):
    write_vocab(tmp_path / "qwen.tiktoken", tiny_tokens())
    tok = Tokenizer.from_file(tmp_path)
    assert tok.path == tmp_path / "qwen.tiktoken"
    assert tok.n_bpe == 260
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (260, 261, 262)
    assert tok.vocab_size == len(tok) == 260 + 208
    assert tok.encode("hello hell") == [259, 32, 258]
    assert tok.encode("<|im_end|>", allowed_special="all") == [262]
    assert tok.decode([261, 259]) == "<|im_start|>hello"


def test_special_tokens_override(tmp_path):
    write_vocab(tmp_path / "qwen.tiktoken", tiny_tokens())
    tok = Tokenizer.from_file(tmp_path, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert tok.vocab_size == 263
    with pytest.raises(QwenkitError, match="im_end"):
        Tokenizer.from_file(tmp_path, special_tokens=("<|endoftext|>", "<|im_start|>"))


@pytest.mark.parametrize(
    "bad_line", ["aGVsbG8=", "aGVsbG8= 256 7", "!!notbase64!! 256", "aGVsbG8= x", "AA== 256"]
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "qwen.tiktoken"
    write_vocab(path, [bytes([b]) for b in range(256)])
    path.write_text(path.read_text().replace("AQ== 1\n", f"AQ== 1\n{bad_line}\n"))
    with pytest.raises(QwenkitError, match=r"qwen\.tiktoken:3:"):
        Tokenizer.from_file(path)


def test_bad_ranks(tmp_path):
    path = tmp_path / "qwen.tiktoken"
    write_vocab(path, [bytes([b]) for b in range(256)])
    with path.open("a") as f:
        f.write(f"{base64.b64encode(b'ab').decode()} 300\n")
    with pytest.raises(QwenkitError, match="ranks"):
        Tokenizer.from_file(path)
    write_vocab(path, [bytes([b]) for b in range(255)])
    with pytest.raises(QwenkitError, match="byte 255"):
        Tokenizer.from_file(path)
