"""The Qwen tokenizer: byte-level BPE over the `qwen.tiktoken` vocabulary, run by tiktoken.

Vocabulary file: one line per token, `base64(token_bytes) rank`. The special tokens follow the
last BPE rank (151643 for the official vocabulary), so the same code serves smaller vocabularies.
Unlike the official tokenizer, special-token text inside ordinary text stays plain text unless
the caller allows it, so user content can never inject control tokens.
"""

from __future__ import annotations

import base64
import codecs
import operator
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

from qwenkit.errors import QwenkitError

VOCAB_FILENAME = "qwen.tiktoken"

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))

AllowedSpecial = Literal["all"] | AbstractSet[str]
DisallowedSpecial = Literal["all"] | Collection[str]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _disallowed_special_error(e: ValueError) -> QwenkitError:
    # tiktoken's message is several lines; its first line names the token.
    first_line = (str(e).splitlines() or ["disallowed special token in text"])[0]
    return QwenkitError(f"{first_line} (list it in allowed_special, or leave it out of disallowed_special)")


def load_vocab(path: Path) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file into {token_bytes: rank}; malformed lines name file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                encoded, rank_text = fields
                token, rank = base64.b64decode(encoded, validate=True), int(rank_text)
            except ValueError:  # wrong number of fields, bad base64 (binascii.Error) or a non-integer rank
                raise QwenkitError(
                    f"{path}:{lineno}: malformed vocabulary line {line[:60]!r}, expected 'base64(token) rank'"
                ) from None
            if token in ranks:
                raise QwenkitError(f"{path}:{lineno}: token {token!r} appears twice in the vocabulary")
            ranks[token] = rank
    return ranks


class Tokenizer:
    """Encode text to Qwen token ids and back; special tokens take the ids after the last BPE rank."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        path: Path | None = None,
    ) -> None:
        where = f"{path}: " if path is not None else ""
        n_bpe = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_bpe)):
            raise QwenkitError(f"{where}vocabulary ranks must be exactly 0..{n_bpe - 1}, each used once")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise QwenkitError(f"{where}vocabulary lacks single-byte tokens (e.g. byte {missing[0]})")
        required = {ENDOFTEXT, IM_START, IM_END}
        if len(set(special_tokens)) != len(special_tokens) or not required <= set(special_tokens):
            raise QwenkitError(f"special tokens must be unique and include {ENDOFTEXT}, {IM_START}, {IM_END}")

        self._path = path
        self._n_bpe = n_bpe
        self._special_tokens = {name: n_bpe + i for i, name in enumerate(special_tokens)}
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self._special_tokens
        )
        # id -> raw bytes, for token_bytes() and streaming decoders.
        self._id_to_bytes: list[bytes] = [b""] * self.vocab_size
        for token, rank in mergeable_ranks.items():
            self._id_to_bytes[rank] = token
        for name, token_id in self._special_tokens.items():
            self._id_to_bytes[token_id] = name.encode("utf-8")

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
        """Load from a `qwen.tiktoken` file, or from a checkpoint directory that contains one."""
        path = Path(path)
        if path.is_dir():
            vocab = path / VOCAB_FILENAME
            if not vocab.is_file():
                raise QwenkitError(
                    f"no {VOCAB_FILENAME} in {path}: put the Qwen vocabulary file {VOCAB_FILENAME} "
                    "there (it ships with official checkpoints and the dashscope package)"
                )
            path = vocab
        elif not path.is_file():
            raise QwenkitError(
                f"vocabulary file {path} not found: pass the path of a {VOCAB_FILENAME} file, "
                f"or of a checkpoint directory that contains {VOCAB_FILENAME}"
            )
        return cls(load_vocab(path), special_tokens=special_tokens, path=path)

    @property
    def path(self) -> Path | None:
        """The vocabulary file this tokenizer was loaded from (None when built in memory)."""
        return self._path

    @property
    def n_bpe(self) -> int:
        """Number of BPE ranks; special token ids start here."""
        return self._n_bpe

    @property
    def vocab_size(self) -> int:
        """Number of used ids: BPE ranks plus special tokens (151851 for the official vocabulary)."""
        return self._n_bpe + len(self._special_tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._special_tokens)

    @property
    def eod_id(self) -> int:
        return self._special_tokens[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        """Qwen has no separate pad token; padding uses `<|endoftext|>`."""
        return self.eod_id

    @property
    def im_start_id(self) -> int:
        return self._special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_tokens[IM_END]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """NFC-normalize and encode `text`.

        `allowed_special` ("all" or a set of special-token strings) lists the special tokens that
        become control ids; any other special-token text is encoded as plain text. Special tokens
        in `disallowed_special` ("all" = every one not allowed) raise QwenkitError instead.
        """
        try:
            return self._enc.encode(
                _nfc(text), allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        except ValueError as e:
            raise _disallowed_special_error(e) from None

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
        num_threads: int = 8,
    ) -> list[list[int]]:
        """`encode` for many texts at once, on `num_threads` threads (tiktoken releases the GIL)."""
        try:
            return self._enc.encode_batch(
                [_nfc(t) for t in texts],
                num_threads=num_threads,
                allowed_special=allowed_special,
                disallowed_special=disallowed_special,
            )
        except ValueError as e:
            raise _disallowed_special_error(e) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids (list, 1-D tensor or array) -> text; incomplete UTF-8 becomes U+FFFD by default."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self._n_bpe]
        return self._enc.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; for a special token, its text in UTF-8."""
        (token_id,) = self._check_ids([token_id])
        return self._id_to_bytes[token_id]

    def save(self, path: str | Path) -> None:
        """Write the BPE ranks as a `qwen.tiktoken` file (special tokens follow implicitly)."""
        lines = (base64.b64encode(self._id_to_bytes[rank]) + b" %d\n" % rank for rank in range(self._n_bpe))
        Path(path).write_bytes(b"".join(lines))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensor, numpy array
            ids = ids.tolist()
            if not isinstance(ids, list):
                raise QwenkitError("token ids must be a 1-D sequence, got a scalar")
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise QwenkitError("token ids must be a 1-D sequence of integers") from None
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise QwenkitError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids


class StreamDecoder:
    """Turn a stream of token ids into text deltas, never emitting half of a multi-byte character.

    The concatenation of every `push()` result and the final `flush()` equals `tokenizer.decode`
    of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        data = self.tokenizer.token_bytes(token_id)
        if self.skip_special_tokens and token_id >= self.tokenizer.n_bpe:
            return ""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return the rest, with U+FFFD for an incomplete trailing character."""
        return self._utf8.decode(b"", final=True)
