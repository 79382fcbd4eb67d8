"""qwenkit's compiled MinHash signature kernel (minhash_kernel.cpp), built on first use with
torch.utils.cpp_extension and cached on disk by torch, as qwenkit.quant's CPU kernels are.

`steps.minhash_signatures` uses it when it builds: Python does NFKC and case folding (C speed), the kernel
does the rest of `steps.match_words` (which characters are words), the XXH3 of every word, the 5-gram
shingle hashes and datatrove's 160 permutations with their minimum, for a whole batch of documents in one
call. Where no compiler is available a warning is given once and the numpy path in `steps` runs instead
(the same numbers; it is also the reference in tests/test_data_minhash_kernel.py).

Which characters are words is not restated in C++: `character_classes` runs `steps`' own `regex` patterns
over every code point (about 0.3 s, then cached on disk) and hands the kernel a table, so the kernel's
words are the pattern's words for whatever Unicode version the installed `regex` knows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np

CODE_POINTS = 0x110000
SEPARATOR, CJK, RUN = 0, 1, 2  # the kernel's character classes (minhash_kernel.cpp)


def _code_points(found: list[str]) -> np.ndarray:
    return np.frombuffer("".join(found).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def cached_character_classes() -> np.ndarray:
    """`character_classes()`, kept on disk (~/.cache/qwenkit, 1 MiB) under a key of the installed `regex`
    version and the patterns, so that every process (a datatrove task) does not pay for it again."""
    import regex

    from qwenkit.data import steps

    patterns = (steps._WORD.pattern, steps._CJK_CHAR.pattern, steps._NOT_WORD.pattern)
    key = hashlib.sha256(repr((regex.__version__, patterns)).encode()).hexdigest()[:16]
    path = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "qwenkit"
        / f"minhash-classes-{key}.npy"
    )
    with contextlib.suppress(OSError, ValueError):
        classes = np.load(path)
        if classes.shape == (CODE_POINTS,) and classes.dtype == np.uint8:
            return classes
    classes = character_classes()
    with contextlib.suppress(OSError):  # a read-only home only costs the 0.3 s again
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(partial, "wb") as f:
            np.save(f, classes)
        os.replace(partial, path)
    return classes


def character_classes() -> np.ndarray:
    """uint8 [0x110000]: how `steps.match_words` treats each code point after NFKC + case folding.

    `match_text` turns every character of `steps._NOT_WORD` (punctuation, symbols, whitespace) into a
    space; `steps._WORD` then takes each CJK character alone and maximal runs of its other word characters.
    The run pattern's `['’]` joiner never fires after that (both are punctuation: checked here), so a
    word is exactly one CJK character or a maximal run of RUN characters, and anything else separates."""
    from qwenkit.data import steps

    chars = "".join(map(chr, range(CODE_POINTS)))
    classes = np.zeros(CODE_POINTS, dtype=np.uint8)
    classes[_code_points(steps._WORD.findall(chars))] = RUN
    cjk = _code_points(steps._CJK_CHAR.findall(chars))
    classes[cjk[classes[cjk] == RUN]] = CJK
    classes[_code_points(steps._NOT_WORD.findall(chars))] = SEPARATOR
    if classes[ord("'")] != SEPARATOR or classes[ord("’")] != SEPARATOR:
        raise RuntimeError("the word pattern's apostrophes are no longer removed by match_text")
    return classes


def normalize(text: str) -> str:
    """The part of `steps.match_text` that stays in Python: NFKC, then case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


class MinhashKernel:
    """The built extension and its character table."""

    def __init__(self, module, table: np.ndarray):
        self.module = module
        self.table = table

    def signatures(
        self,
        texts: list[str],
        a: np.ndarray,
        b: np.ndarray,
        n_grams: int,
        mask: int,
        out: np.ndarray,
        threads: int = 1,
    ) -> np.ndarray:
        """Fills `out` [len(texts), permutations] (uint64, C order) with the MinHash rows of `texts`;
        rows of texts without words are left as they are. Returns which texts had words (bool)."""
        has_words = np.zeros(len(texts), dtype=np.uint8)
        normalized = [normalize(text) for text in texts]
        self.module.signatures(
            normalized,
            self.table,
            np.ascontiguousarray(a, dtype=np.uint64).ravel(),
            np.ascontiguousarray(b, dtype=np.uint64).ravel(),
            n_grams,
            mask,
            out,
            has_words,
            threads,
        )
        return has_words.astype(bool)

    def shingles(self, text: str, n: int = 5) -> np.ndarray:
        """`steps.shingles(text, n)` computed by the kernel (sorted, unique)."""
        return np.unique(self.module.shingles(normalize(text), self.table, n))

    def words(self, text: str) -> list[str]:
        """`steps.match_words(text)` as the kernel splits it."""
        return self.module.words(normalize(text), self.table)


def _build():
    import pyarrow

    from qwenkit.extensions import build_extension

    return build_extension(
        "qwenkit_minhash_kernel",
        sources=[str(Path(__file__).with_name("minhash_kernel.cpp"))],
        extra_include_paths=[pyarrow.get_include()],  # arrow/vendored/xxhash/xxhash.h: the official xxHash
        extra_cflags=["-O3"],
    )


def _self_check(kernel: MinhashKernel) -> None:
    """The kernel agrees with the Python path on a sample (words, XXH3, shingles), or raises."""
    import xxhash

    from qwenkit.data import steps

    sample = "Hello,  World! 世界 it’s 2024年 ＡＢＣ café ﬁne ΣΊΣΥΦΟΣ カタカナ 한국어 a_b x\x00y 😀 e\u0301"
    if kernel.words(sample) != steps.match_words(sample):
        raise RuntimeError("its words differ from steps.match_words")
    if kernel.module.xxh3("café".encode()) != xxhash.xxh3_64_intdigest("café"):
        raise RuntimeError("its XXH3 differs from the xxhash package's")
    if not np.array_equal(kernel.shingles(sample, 5), steps.shingles(sample, 5)):
        raise RuntimeError("its shingles differ from steps.shingles")


@functools.cache
def load() -> MinhashKernel | None:
    """The kernel, built on the first call of the process (then cached by torch on disk), or None with a
    warning when it cannot be built or disagrees with the Python path (which then runs instead)."""
    try:
        kernel = MinhashKernel(_build(), cached_character_classes())
        _self_check(kernel)
    except Exception as error:  # no compiler, a build failure, a mismatch: the numpy path still works
        warnings.warn(f"qwenkit MinHash kernel unavailable ({error}); using the numpy path", stacklevel=2)
        return None
    return kernel
