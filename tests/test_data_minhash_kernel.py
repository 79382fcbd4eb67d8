"""qwenkit.data.minhash_kernel: the compiled kernel gives exactly the words, shingles and signatures of the
Python path in qwenkit.data.steps (itself bit-identical to datatrove's MinhashDedupSignature, see
test_data_steps.py), on hand-picked, real, exhaustive and random text; it falls back with a warning."""

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.data import minhash_kernel, steps

# Written for this test.
EN = (
    "The lighthouse keeper climbed the ninety-two steps every evening at dusk. He trimmed the wick, polished "
    "the lens with a soft cloth, and wrote the weather into a ledger that nobody else ever read."
)
ZH = (
    "灯塔看守人每天傍晚都要爬上九十二级台阶。他修剪灯芯，用软布擦亮透镜，再把天气记在一本没有别人读过的账簿里。"
    "冬天的时候，海风很大，他常常要在灯塔里守一整夜。"
)
CASES = [
    EN,
    ZH,
    EN[:90] + ZH[:30] + " mixed 中英 text, it's 2024年!",
    "",
    "   ",
    "word",
    "中",
    "!!! ??? ...",
    "Hello 😀 world 👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇩🇪 end",
    "nul\x00inside\x01control\x7fchars\x1b[0m and\ttabs\r\nand\x0bvertical\x0cfeeds",
    "ＦＵＬＬ－ＷＩＤＴＨ ｌｅｔｔｅｒｓ，全角标点。",
    "Straße ΣΊΣΥΦΟΣ İstanbul ﬁne ﬀ ǅ ß",
    "e\u0301 a\u0308 combining\u0300 \u0301alone 中\u0301",
    "カタカナー ひらがな 한국어 문장 々 〆 〇",
    "don't it’s rock'n'roll O'Neil",
    "snake_case_name __dunder__ a_b",
    "٣٤٥ ١٢ Ⅻ ½ ² ⑩ 𝟘𝟙",
    "line\u2028separator\u2029paragraph\u00a0nbsp\u200bzero\u200dwidth\ufeffbom",
    "lone \ud800 surrogate \udfff pair \ud83d\ude00",
    "private \ue000\uf8ff use \U000f0000 unassigned \U0003ffff \u0378",
    "ⅷ ǈ ᾈ ﬅ",
]


@pytest.fixture(scope="module")
def kernel():
    built = minhash_kernel.load()
    if built is None:
        pytest.skip("the MinHash kernel cannot be built here (no C++ compiler?)")
    return built


def site_documents(limit: int = 300) -> list[str]:
    """Real text found on the machine: package descriptions in site-packages."""
    site = Path(np.__file__).resolve().parent.parent
    texts = [
        p.read_text(encoding="utf-8", errors="replace") for p in sorted(site.glob("*.dist-info/METADATA"))
    ]
    return [t for t in texts if t.strip()][:limit]


def config(**kwargs) -> MinhashConfig:
    return MinhashConfig(**{"n_grams": 5, "num_buckets": 20, "hashes_per_bucket": 8, "seed": 1, **kwargs})


@pytest.mark.parametrize("text", CASES)
def test_words_and_shingles_equal_the_python_path(kernel, text):
    assert kernel.words(text) == steps.match_words(text)
    for n in (1, 2, 5, 13):
        np.testing.assert_array_equal(kernel.shingles(text, n), steps.shingles(text, n))


def test_every_code_point_splits_as_the_regex_does(kernel):
    # all of Unicode in a shuffled order, so that every class meets every other; surrogates included
    points = list(range(minhash_kernel.CODE_POINTS))
    random.Random(0).shuffle(points)
    for start in range(0, len(points), 1 << 18):
        text = "".join(map(chr, points[start : start + (1 << 18)]))
        assert kernel.words(text) == steps.match_words(text)
    classes = kernel.table
    assert classes[ord("a")] == classes[ord("é")] == classes[ord("한")] == minhash_kernel.RUN
    assert classes[ord("中")] == classes[ord("カ")] == classes[ord("ひ")] == minhash_kernel.CJK
    assert (
        classes[ord(" ")] == classes[ord(",")] == classes[ord("_")] == classes[0] == minhash_kernel.SEPARATOR
    )


def test_the_character_table_is_cached_on_disk_and_read_back(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = minhash_kernel.cached_character_classes()  # computed and written
    (written,) = (tmp_path / "qwenkit").glob("minhash-classes-*.npy")
    np.testing.assert_array_equal(fresh, minhash_kernel.character_classes())
    np.testing.assert_array_equal(np.load(written), fresh)
    written.write_bytes(b"not a table")  # a damaged file is computed again
    np.testing.assert_array_equal(minhash_kernel.cached_character_classes(), fresh)


def test_signatures_equal_the_python_path_on_real_and_synthetic_text(kernel):
    rng = random.Random(1)
    long_words = [rng.choice(EN.split() + list(ZH)) for _ in range(30_000)]
    texts = [*CASES, *(t[:20_000] for t in site_documents(200)), " ".join(long_words), "".join(long_words)]
    for cfg in (config(), config(seed=7, n_grams=3, num_buckets=14, hash_config=HashConfig(precision=32))):
        reference = steps.minhash_signatures(texts, cfg, kernel=False)
        for threads in (1, 2, 3):
            np.testing.assert_array_equal(steps.minhash_signatures(texts, cfg, threads=threads), reference)
    empty = steps.minhash_signatures(["", "!!", "word"], config())
    assert (empty[:2] == np.iinfo(np.uint64).max).all() and (empty[2] < (1 << 61) - 1).all()


def test_thirty_two_bit_signatures_are_masked_as_datatroves(kernel, tmp_path):
    cfg = config(hash_config=HashConfig(precision=32))
    ours = steps.minhash_signatures([EN, ZH], cfg)
    stage = MinhashDedupSignature(str(tmp_path), cfg, language=steps.CjkWordTokenizer("x"))
    for text, row in zip([EN, ZH], ours, strict=True):
        expected = np.concatenate(stage.get_signature(steps.shingles(text).reshape(-1, 1)))
        np.testing.assert_array_equal(row, expected.astype(np.uint64))
        assert row.max() <= 0xFFFFFFFF


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet=st.characters(exclude_categories=()), max_size=80), max_size=6),
    st.integers(1, 6),
)
def test_random_unicode_gives_the_python_paths_signatures(texts, n_grams):
    built = minhash_kernel.load()
    if built is None:
        pytest.skip("the MinHash kernel cannot be built here")
    for text in texts:
        assert built.words(text) == steps.match_words(text)
    cfg = config(n_grams=n_grams, num_buckets=4, hashes_per_bucket=2)
    np.testing.assert_array_equal(
        steps.minhash_signatures(texts, cfg), steps.minhash_signatures(texts, cfg, kernel=False)
    )


def test_the_pipeline_stage_writes_the_same_bucket_files_as_datatroves_own_loop(kernel, tmp_path):
    docs = [Document(text=t, id=str(i)) for i, t in enumerate([*CASES, *site_documents(60)])]
    cfg = config()
    batched = steps.CjkMinhashSignature(tmp_path / "batched", cfg)
    batched.batch_size = 16  # several kernel calls
    batched.run(iter(docs))
    per_document = steps.CjkMinhashSignature(tmp_path / "loop", cfg)
    # datatrove's own loop: Python shingles and its get_signature, one document at a time
    MinhashDedupSignature.run(per_document, iter(docs))
    files = sorted(p.relative_to(tmp_path / "loop") for p in (tmp_path / "loop").rglob("*.sig"))
    assert len(files) == cfg.num_buckets
    for name in files:
        assert (tmp_path / "batched" / name).read_bytes() == (tmp_path / "loop" / name).read_bytes()


def test_a_kernel_that_cannot_build_or_disagrees_falls_back_with_a_warning(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler")

    wrong = minhash_kernel.character_classes().copy()
    wrong[ord("l")] = minhash_kernel.SEPARATOR  # "hello" is in the self-check's sample
    for name, patch in (("_build", no_compiler), ("cached_character_classes", lambda: wrong)):
        with monkeypatch.context() as m:
            m.setattr(minhash_kernel, name, patch)
            minhash_kernel.load.cache_clear()
            with pytest.warns(UserWarning, match="MinHash kernel unavailable"):
                assert minhash_kernel.load() is None
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once per process, not per call
                signatures = steps.minhash_signatures([EN, ZH], config())
        minhash_kernel.load.cache_clear()
        np.testing.assert_array_equal(signatures, steps.minhash_signatures([EN, ZH], config(), kernel=False))
