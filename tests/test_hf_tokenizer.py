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


# --- Reading tokenizer.json: Qwen2.5-style checkpoints (the qwen25_dir fixture) and malformed files.

QWEN25_CONTROL = {
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
}  # fmt: skip
QWEN25_PLAIN = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen25_tokenizer(qwen25_dir):
    return Tokenizer.from_file(qwen25_dir)


@pytest.fixture(scope="module")
def qwen25_auto(qwen25_dir):
    return AutoTokenizer.from_pretrained(qwen25_dir)


@pytest.fixture(scope="module")
def qwen25_loaded(qwen25_dir):
    import qwenkit

    return qwenkit.load(qwen25_dir)


def mixed_corpus(tokenizer: Tokenizer, seed: int = 0) -> list[str]:
    """Documents of English and code (qwenkit's own sources and docs), Chinese, emoji, numbers,
    whitespace runs, odd Unicode (combining marks out of order, NFD, U+0338 after '>') and the
    added tokens' text, glued to words and to each other."""
    import random
    from pathlib import Path

    rng = random.Random(seed)
    root = Path(__file__).parent.parent
    docs = [p.read_text(encoding="utf-8") for p in sorted((root / "src" / "qwenkit").rglob("*.py"))[:40]]
    docs += [
        p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    ]
    chinese = []
    for rank in range(tokenizer.n_bpe):
        try:
            piece = tokenizer.token_bytes(rank).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if piece and all("\u4e00" <= ch <= "\u9fff" for ch in piece):
            chinese.append(piece)
    names = list(tokenizer.special_tokens)
    odd = ["e\u0301", "a\u0323\u0302", "\u1e0b\u0323", "\u0338", "\u0301\u0301", "\ufeff", "\u200d",
           "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f1e8\U0001f1f3", "\u00a0", "\u3000",
           "\r\n", "\t\t", "    ", "\n\n\n", "\u0e01\u0e34", "\u05e9\u05c1", "Å", "ﬁ", "①", "𝔘"]  # fmt: skip
    pools = [
        lambda: "".join(rng.choices(chinese, k=rng.randint(1, 12))) + rng.choice("，。！？；：、 \n"),
        lambda: rng.choice(["The", "quick", "naïve", "café", "don't", "we'LL", "API", "x"]) + " ",
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))) + rng.choice([".", ",", " ", "e-9", "%"]),
        lambda: rng.choice(odd),
        lambda: rng.choice(["🦜", "🦩", "😀", "👍🏽", "🇺🇸"]) * rng.randint(1, 3),
        lambda: " " * rng.randint(1, 9) + rng.choice(["", "\n", "x"]),
        lambda: rng.choice(names) + rng.choice(["", "\u0338", " ", "\n", "a", ">"]),
        lambda: rng.choice(["def f(x):\n", "    return x**2\n", '{"a": [1, 2]}', "</tool_call>>"]),
    ]
    for _ in range(400):
        docs.append("".join(rng.choice(pools)() for _ in range(rng.randint(20, 200))))
    docs += [unicodedata.normalize("NFD", d) for d in docs[-40:]]
    return docs


def test_qwen25_added_tokens(qwen25_dir, qwen25_tokenizer):
    tok = qwen25_tokenizer
    assert tok.kind == "tokenizer.json" and tok.path == qwen25_dir / "tokenizer.json"
    assert tok.vocab_size == len(tok) == 151665 and tok.n_bpe == 151643
    assert tok.special_tokens["<|im_start|>"] == tok.im_start_id == 151644
    assert tok.special_tokens["<|video_pad|>"] == 151656
    assert tok.special_tokens["<tool_call>"] == 151657 and tok.special_tokens["<|file_sep|>"] == 151664
    assert tok.control_tokens == QWEN25_CONTROL
    assert set(tok.special_tokens) == QWEN25_CONTROL | set(QWEN25_PLAIN)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", None, "<|endoftext|>")
    assert (tok.eod_id, tok.im_end_id, tok.pad_id) == (151643, 151645, 151643)
    template = json.loads((qwen25_dir / "tokenizer_config.json").read_text()).get("chat_template")
    assert tok.chat_template == template and (template is None or "<tool_call>" in template)
    again = Tokenizer.from_file(qwen25_dir / "tokenizer.json")
    assert again.special_tokens == tok.special_tokens and again.control_tokens == tok.control_tokens


def test_qwen25_same_ids_as_auto_tokenizer(qwen25_tokenizer, qwen25_auto):
    docs = mixed_corpus(qwen25_tokenizer)
    got = qwen25_tokenizer.encode_batch(docs, allowed_special="all")
    expected = qwen25_auto(docs)["input_ids"]
    assert sum(map(len, expected)) >= 100_000
    added = {i for ids in expected for i in ids if i >= 151643}
    assert added == set(range(151643, 151665))  # every added token was recognized somewhere
    mismatches = [(d[:80], g[:20], e[:20]) for d, g, e in zip(docs, got, expected, strict=True) if g != e]
    assert mismatches == []
    assert [qwen25_tokenizer.encode(d, allowed_special="all") for d in docs[-50:]] == expected[-50:]


def test_qwen25_default_encode_keeps_added_tokens_plain(qwen25_tokenizer, official_tokenizer):
    tok = qwen25_tokenizer
    text = '<|im_start|>user\n<tool_call>\n{"name": "x"}\n</tool_call><|fim_prefix|><|im_end|>'
    ids = tok.encode(text)
    assert all(i < tok.n_bpe for i in ids)
    assert ids == official_tokenizer.encode(text)  # plain BPE, as the qwen.tiktoken vocabulary gives
    assert tok.decode(ids) == text
    one = tok.encode(text, allowed_special={"<tool_call>"})
    assert [i for i in one if i >= tok.n_bpe] == [151657]
    both = tok.encode(text, allowed_special={"<tool_call>", "<|im_start|>"})
    assert [i for i in both if i >= tok.n_bpe] == [151644, 151657]
    with pytest.raises(QwenkitError, match="tool_call"):
        tok.encode(text, allowed_special={"<|im_start|>"}, disallowed_special="all")


def test_qwen25_decode_like_transformers(qwen25_tokenizer, qwen25_auto):
    tok = qwen25_tokenizer
    text = '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    ids = tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == qwen25_auto.decode(ids) == text
    skipped = tok.decode(ids, skip_special_tokens=True)
    assert skipped == qwen25_auto.decode(ids, skip_special_tokens=True)
    assert skipped.startswith("assistant\n<tool_call>") and "<|im_end|>" not in skipped
    docs = mixed_corpus(tok, seed=1)[-60:]
    for ids in qwen25_auto(docs)["input_ids"]:
        assert tok.decode(ids) == qwen25_auto.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == qwen25_auto.decode(ids, skip_special_tokens=True)


def test_qwen25_loads_with_transformers_logits(qwen25_dir, qwen25_loaded):
    import torch
    import transformers

    model, tok = qwen25_loaded
    assert tok.kind == "tokenizer.json" and model.config.vocab_size == 151936
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen25_dir, dtype=torch.float32).eval()
    ids = tok.encode("<|im_start|>user\n你好, <tool_call>?<|im_end|>\n", allowed_special="all")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)


def test_qwen25_save_load_round_trip(qwen25_loaded, tmp_path):
    import qwenkit

    model, tok = qwen25_loaded
    out = qwenkit.save(model, tok, tmp_path / "saved")
    assert not (out / "qwen.tiktoken").exists()
    back = Tokenizer.from_file(out)
    assert back.kind == "tokenizer.json"
    assert back.special_tokens == tok.special_tokens and back.control_tokens == tok.control_tokens
    assert (back.eos_token, back.bos_token, back.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)
    assert back.chat_template == tok.chat_template
    auto = AutoTokenizer.from_pretrained(out)
    docs = mixed_corpus(tok, seed=2)[-20:]
    assert auto(docs)["input_ids"] == back.encode_batch(docs, allowed_special="all")
    assert auto.decode([151657, 151645], skip_special_tokens=True) == "<tool_call>"


def test_qwenkit_trained_vocabulary_round_trips(tmp_path):
    from qwenkit.hf_tokenizer import read_hf_tokenizer
    from qwenkit.tokenizer_train import train_vocab

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        ("hello world, 你好世界! numbers 12345 and code: def f(x): return x\n" * 30) + "ünïcödé ok\n"
    )
    tok = Tokenizer(train_vocab([corpus], 330, progress=False))
    write_hf_tokenizer(tok, tmp_path / "hf")
    back = read_hf_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert back.kind == "tokenizer.json" and back.n_bpe == tok.n_bpe > 256
    assert [back.token_bytes(i) for i in range(back.vocab_size)] == [
        tok.token_bytes(i) for i in range(tok.vocab_size)
    ]
    assert back.special_tokens == tok.special_tokens and back.control_tokens == set(SPECIAL_TOKENS)
    assert back.pat_str == tok.pat_str and back.nfc
    text = corpus.read_text() + "<|im_start|><|extra_3|>"
    assert back.encode(text) == tok.encode(text)
    assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_qwen_tiktoken_wins_when_both_exist(tmp_path):
    tok = Tokenizer(tiny_ranks())
    write_hf_tokenizer(tok, tmp_path)
    assert Tokenizer.from_file(tmp_path).kind == "tokenizer.json"
    tok.save(tmp_path / "qwen.tiktoken")
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.kind == "qwen.tiktoken" and loaded.chat_template is None
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == ("<|endoftext|>", None, "<|endoftext|>")


def test_chat_template_sources(tmp_path):
    tok = Tokenizer(tiny_ranks())
    write_hf_tokenizer(tok, tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    config_file.write_text(json.dumps(config))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.chat_template == "D" and loaded.eos_token == "<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("J")  # transformers prefers the file
    assert Tokenizer.from_file(tmp_path).chat_template == "J"
    (tmp_path / "chat_template.jinja").unlink()
    del config["chat_template"], config["eos_token"]
    config_file.write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "C"}))
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.chat_template == "C" and loaded.eos_token is None


def test_alternative_merges_are_accepted(tmp_path):
    """transformers' tiktoken converter writes every split of a token as a merge, in rank order."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"bc": 257, b"abc": 258})
    tok = Tokenizer(ranks)
    write_hf_tokenizer(tok, tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    assert merges[-1] in (["ab", "c"], "ab c")  # the merge rank-ordered BPE reaches for "abc"
    merges.append(["a", "bc"] if isinstance(merges[-1], list) else "a bc")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    loaded = Tokenizer.from_file(tmp_path)
    for text in ["abc", "xabcbc", "bcabc a"]:
        assert loaded.encode(text) == tok.encode(text)


def test_normalized_added_tokens_match_after_nfc(tmp_path):
    """Tokens added with `normalized=True` (transformers' add_tokens default) are found in the NFC text,
    the others in the raw text, as `tokenizers` does; written back with the same flags."""
    write_hf_tokenizer(Tokenizer(tiny_ranks()), tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_tokens(
        [tokenizers.AddedToken("<x>", normalized=True), tokenizers.AddedToken("e\u0301!", normalized=True)]
    )
    hf.add_tokens([tokenizers.AddedToken("<y>", normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())  # transformers 5 reads this table
    for token_id, content, normalized in [(475, "<x>", True), (476, "e\u0301!", True), (477, "<y>", False)]:
        config["added_tokens_decoder"][str(token_id)] = {
            "content": content,
            "normalized": normalized,
            "special": False,
        }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.normalized_tokens == {"<x>", "e\u0301!"} and "<y>" not in tok.control_tokens
    auto = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a<x>b<y>", "<x>\u0338 <y>\u0338", "e\u0301! \u00e9!", "<y>e\u0301!<x>", "<|im_end|>\u0338"]
    assert tok.encode_batch(texts, allowed_special="all") == auto(texts)["input_ids"]
    assert tok.encode("<x>\u0338", allowed_special="all") == tok.encode("<x\u226f")  # NFC ate the '>'
    write_hf_tokenizer(tok, tmp_path / "again")
    assert Tokenizer.from_file(tmp_path / "again").normalized_tokens == tok.normalized_tokens


def _mutate(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _swap_merges(data):
    merges = data["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]


def _set(keys, value):
    def change(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(["model", "type"], "WordPiece"), "model.type 'WordPiece'"),
        (_set(["model", "byte_fallback"], True), "model.byte_fallback"),
        (_set(["model", "dropout"], 0.1), "model.dropout"),
        (_set(["normalizer"], {"type": "NFKC"}), "normalizer 'NFKC'"),
        (_set(["pre_tokenizer"], {"type": "Whitespace"}), "pre_tokenizer 'Whitespace'"),
        (_set(["pre_tokenizer", "pretokenizers", 0, "behavior"], "Removed"), "behavior"),
        (_set(["decoder"], {"type": "WordPiece"}), "decoder.type"),
        (_set(["post_processor"], {"type": "TemplateProcessing"}), "post_processor.type"),
        (_swap_merges, r"model.merges\[10\].*out of rank order"),
        (lambda d: d["model"]["merges"].pop(), r"model.merges lacks \('ä½', 'ł'\).*token 'ä½ł' \(id 266\)"),
        (lambda d: d["model"]["vocab"].update({"\u4e2d": 500}), "model.vocab token '中'"),
        (lambda d: d["added_tokens"][1].update(lstrip=True), r"added_tokens\[1\].lstrip"),
        (lambda d: d["added_tokens"][-1].update(id=9999), r"added_tokens: id 9999"),
        (lambda d: d["added_tokens"].pop(1), r"added_tokens: id 269 \('<\|im_end\|>'\)"),
    ],
)
def test_malformed_tokenizer_json(tmp_path, change, message):
    write_hf_tokenizer(Tokenizer(tiny_ranks()), tmp_path)
    _mutate(tmp_path / "tokenizer.json", change)
    (tmp_path / "tokenizer_config.json").unlink()  # its table would fill the gaps made above
    with pytest.raises(QwenkitError, match=message) as info:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(info.value) and "tokenizer.json" in str(info.value)


def test_malformed_tokenizer_config(tmp_path):
    write_hf_tokenizer(Tokenizer(tiny_ranks()), tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "eos_token": "</s>"}))
    with pytest.raises(QwenkitError, match="eos_token '</s>' is not one of the added tokens"):
        Tokenizer.from_file(tmp_path)
    config_file.write_text(json.dumps({**config, "chat_template": 7}))
    with pytest.raises(QwenkitError, match="chat_template must be a string"):
        Tokenizer.from_file(tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(QwenkitError, match="cannot read .*tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(QwenkitError, match="expected a JSON object"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
