"""Hugging Face tokenizer export: files written by qwenkit must tokenize exactly like qwenkit."""

import json
import unicodedata

import pytest
import tokenizers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from qwenkit.chat import make_context
from qwenkit.errors import QwenkitError
from qwenkit.hf_tokenizer import _bpe_parts, bytes_to_unicode, derive_merges, write_hf_tokenizer
from qwenkit.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, we've DONE it, you'D agree",
    "12345",
    "你好",
    "你好，世界！今天天气怎么样？",
    "通义千问是阿里云研发的大语言模型。",
    "def f(x):\n    return x ** 2  # square\n",
    "class A:\n\tdef g(self):\n\t\tpass\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "1234567890 and 3.14159, 1e-9",
    "emoji 🦜🦩 and flags 🇨🇳🇺🇸 👩‍👩‍👧",
    "tabs\t\tand   spaces    \n\n\n  trailing   ",
    "\n\n",
    "\n",
    " ",
    "",
    "\r\n\r\nwindows line endings\r\n",
    "mixed 中文 English 日本語 한국어 العربية",
    "Ünïcödé çàfé naïve résumé",
    unicodedata.normalize("NFD", "Ünïcödé çàfé naïve résumé"),
    unicodedata.normalize("NFD", "한국어 텍스트"),
    "   leading spaces",
    "a" * 50,
    "!!!???...---",
    "https://example.com/path?q=1&r=2#frag",
    "Ωμέγα Привет мир",
    "x²+y²=z² ½ ⅓ ٣",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 42;",
    "<html><body>Text &amp; more</body></html>",
]


@pytest.fixture(scope="module")
def official_dir(official_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_official")
    write_hf_tokenizer(official_tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def hf_auto(official_dir):
    return AutoTokenizer.from_pretrained(official_dir)


@pytest.fixture(scope="module")
def hf_raw(official_dir):
    return tokenizers.Tokenizer.from_file(str(official_dir / "tokenizer.json"))


def test_bytes_to_unicode_is_gpt2_table():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_qwenkit(official_tokenizer, hf_auto, hf_raw, text):
    expected = official_tokenizer.encode(text)
    assert hf_auto.encode(text, add_special_tokens=False) == expected
    assert hf_raw.encode(text, add_special_tokens=False).ids == expected


def test_known_ids(hf_auto):
    assert hf_auto.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]
    assert hf_auto.encode("你好", add_special_tokens=False) == [108386]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.text(alphabet=st.sampled_from(list("ab 中文\n\t  é1'.😀")), max_size=100))
def test_random_text_same_ids(official_tokenizer, hf_raw, text):
    # Hugging Face turns special-token text into control ids; qwenkit keeps it plain text.
    assume(not any(name in text for name in SPECIAL_TOKENS))
    expected = official_tokenizer.encode(text)
    assert hf_raw.encode(text, add_special_tokens=False).ids == expected
    assert hf_raw.decode(expected, skip_special_tokens=False) == official_tokenizer.decode(expected)


def test_vocab_tokens_encode_alike(official_tokenizer, hf_raw):
    """Every 7th vocabulary token, as text, tokenizes the same (covers long and rare tokens)."""
    texts = []
    for rank in range(0, official_tokenizer.n_bpe, 7):
        try:
            texts.append(official_tokenizer.token_bytes(rank).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    got = [e.ids for e in hf_raw.encode_batch(texts, add_special_tokens=False)]
    expected = official_tokenizer.encode_batch(texts)
    mismatches = [t for t, g, e in zip(texts, got, expected, strict=True) if g != e]
    assert mismatches == []


def test_special_tokens_and_sizes(official_tokenizer, hf_auto, hf_raw):
    assert len(hf_auto) == official_tokenizer.vocab_size == 151851
    assert hf_raw.get_vocab_size(with_added_tokens=True) == 151851
    for name, token_id in official_tokenizer.special_tokens.items():
        assert hf_auto.convert_tokens_to_ids(name) == token_id
        assert hf_raw.token_to_id(name) == token_id
    assert hf_auto.convert_tokens_to_ids("<|im_start|>") == 151644
    assert hf_auto.eos_token == "<|endoftext|>" and hf_auto.eos_token_id == 151643
    assert hf_auto.pad_token_id == 151643
    assert hf_auto.bos_token is None


def test_decode_round_trip(official_tokenizer, hf_auto):
    for text in TEXTS:
        ids = official_tokenizer.encode(text)
        assert hf_auto.decode(ids) == official_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    ids = [
        official_tokenizer.im_start_id,
        *official_tokenizer.encode("user\nhi"),
        official_tokenizer.im_end_id,
    ]
    assert hf_auto.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert hf_auto.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_matches_make_context(official_tokenizer, hf_auto):
    text = hf_auto.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=False
    )
    raw, context_ids = make_context(official_tokenizer, "你好", system="You are a helpful assistant.")
    assert text == raw
    assert hf_auto.encode(text, add_special_tokens=False) == context_ids


def test_chat_template_with_system_and_history(official_tokenizer, hf_auto):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text = hf_auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raw, _ = make_context(official_tokenizer, "2+2?", history=[("hi", "hello")], system="Be brief.")
    assert text == raw
    no_prompt = hf_auto.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_eos_token_option(official_tokenizer, tmp_path):
    write_hf_tokenizer(official_tokenizer, tmp_path, eos_token="<|im_end|>", model_max_length=32768)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 32768
    with pytest.raises(QwenkitError, match="eos_token"):
        write_hf_tokenizer(official_tokenizer, tmp_path, eos_token="</s>")


# --- Small vocabularies built here.


def tiny_ranks() -> dict[bytes, int]:
    tokens = [bytes([b]) for b in range(256)]
    tokens += [
        b"he",
        b"ll",
        b"hell",
        b"hello",
        b" w",
        b"or",
        b" wor",
        b"ld",
        b" world",
        b"\xe4\xbd",
        b"\xe4\xbd\xa0",
    ]
    return {token: rank for rank, token in enumerate(tokens)}


def test_derive_merges_tiny():
    assert derive_merges(tiny_ranks()) == [
        (b"h", b"e"),
        (b"l", b"l"),
        (b"he", b"ll"),
        (b"hell", b"o"),
        (b" ", b"w"),
        (b"o", b"r"),
        (b" w", b"or"),
        (b"l", b"d"),
        (b" wor", b"ld"),
        (b"\xe4", b"\xbd"),
        (b"\xe4\xbd", b"\xa0"),
    ]


def test_derive_merges_matches_plain_bpe_on_official_sample(official_tokenizer):
    ranks = {official_tokenizer.token_bytes(r): r for r in range(official_tokenizer.n_bpe)}
    merges = derive_merges(ranks)
    assert len(merges) == official_tokenizer.n_bpe - 256
    multi = sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__)
    for token, (left, right) in list(zip(multi, merges, strict=True))[::97]:
        assert left + right == token
        assert ranks[left] < ranks[token] and ranks[right] < ranks[token]
        assert _bpe_parts(ranks, token, ranks[token]) == [left, right]


def test_unbuildable_token_is_rejected():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # neither "ab" nor "bc" exists, so no pair merges into it
    with pytest.raises(QwenkitError, match="abc"):
        derive_merges(ranks)


def test_tiny_vocab_export(tmp_path):
    tok = Tokenizer(tiny_ranks())
    write_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert len(hf) == tok.vocab_size == 267 + len(SPECIAL_TOKENS)
    assert hf.convert_tokens_to_ids("<|im_start|>") == tok.im_start_id == 268
    for text in ["hello world", "hellohello  world\n", "你好 hello", "held worlds", "", "ολα"]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert hf.decode(ids) == tok.decode(ids)
    assert tok.encode("hello world") == [259, 264]
