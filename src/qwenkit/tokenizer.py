"""The Qwen tokenizer: byte-level BPE run by tiktoken, over `qwen.tiktoken` or `tokenizer.json`.

`qwen.tiktoken` (original Qwen, qwenkit): one line per token, `base64(token_bytes) rank`; the special
tokens follow the last BPE rank (151643 for the official vocabulary), so the same code serves smaller
vocabularies. `tokenizer.json` (Qwen1.5/2/2.5; read by `qwenkit.hf_tokenizer`): the same byte-level
BPE plus its own added-token table, e.g. Qwen2.5's `<|im_start|>` ... `<tool_call>` (151643..151664).

Injection safety: `encode` keeps the text of every added token (control tokens such as `<|im_end|>`
and plain added tokens such as `<tool_call>` alike) as ordinary BPE text unless the caller lists it in
`allowed_special`, so user content can never form them. `allowed_special="all"` recognizes every
added token, which is what transformers' tokenizers do with any text. `decode` renders added tokens
as their text; `skip_special_tokens=True` drops the control tokens only (those flagged special), as
transformers does, so `<tool_call>` stays in the text.
"""

from __future__ import annotations

import base64
import codecs
import operator
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from collections.abc import Set as AbstractSet
from functools import lru_cache
from pathlib import Path
from typing import Literal

import tiktoken

from qwenkit.errors import QwenkitError

VOCAB_FILENAME = "qwen.tiktoken"
HF_TOKENIZER_FILENAME = "tokenizer.json"

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


@lru_cache(maxsize=64)
def _splitter(names: frozenset[str]) -> re.Pattern:
    """A regex whose split() isolates the given added tokens, leftmost-longest as `tokenizers` matches."""
    return re.compile("(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")")


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
    """Encode text to Qwen token ids and back; added tokens take the ids after the last BPE rank.

    `special_tokens` lists the added tokens in id order; `control_tokens` names those flagged special
    (default: all of them, as in `qwen.tiktoken` vocabularies); `normalized_tokens` those matched in
    the normalized text rather than the raw text (`tokenizers`' flag). `pat_str` is the pre-tokenizer regex,
    `nfc` whether text is NFC-normalized first. `kind`, `chat_template` and the eos/bos/pad token names
    describe where the tokenizer came from (`tokenizer.json` checkpoints carry their own).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        path: Path | None = None,
        *,
        control_tokens: AbstractSet[str] | None = None,
        normalized_tokens: AbstractSet[str] = frozenset(),
        pat_str: str = PAT_STR,
        nfc: bool = True,
        kind: Literal["qwen.tiktoken", "tokenizer.json"] = "qwen.tiktoken",
        chat_template: str | None = None,
        eos_token: str | None = ENDOFTEXT,
        bos_token: str | None = None,
        pad_token: str | None = ENDOFTEXT,
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
            raise QwenkitError(
                f"{where}special tokens must be unique and include {ENDOFTEXT}, {IM_START}, {IM_END}"
            )
        control = frozenset(special_tokens if control_tokens is None else control_tokens)
        if not control <= set(special_tokens):
            raise QwenkitError(
                f"{where}control token {sorted(control - set(special_tokens))[0]!r} is not added"
            )
        for field, name in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
            if name is not None and name not in special_tokens:
                raise QwenkitError(f"{where}{field} {name!r} is not one of the added tokens")

        self._path = path
        self._n_bpe = n_bpe
        self._special_tokens = {name: n_bpe + i for i, name in enumerate(special_tokens)}
        self._control_tokens = control
        self._control_ids = frozenset(self._special_tokens[name] for name in control)
        self._normalized_tokens = frozenset(normalized_tokens) & set(special_tokens)
        self._all_names = frozenset(special_tokens)
        self._pat_str = pat_str
        self._nfc = nfc
        self._kind = kind
        self._chat_template = chat_template
        self._eos_token, self._bos_token, self._pad_token = eos_token, bos_token, pad_token
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self._special_tokens
        )
        # id -> raw bytes, for token_bytes() and streaming decoders.
        self._id_to_bytes: list[bytes] = [b""] * self.vocab_size
        for token, rank in mergeable_ranks.items():
            self._id_to_bytes[rank] = token
        for name, token_id in self._special_tokens.items():
            self._id_to_bytes[token_id] = name.encode("utf-8")

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
        """Load a `qwen.tiktoken` file, a `tokenizer.json` file, or a checkpoint directory holding either.

        A directory holding both loads `qwen.tiktoken`: qwenkit writes `tokenizer.json` beside it only as
        an export of the same vocabulary for other libraries, while a Qwen2-family `tokenizer.json`
        checkpoint has no `qwen.tiktoken` (and qwenkit saves none for it). `special_tokens` applies to
        `qwen.tiktoken` only; `tokenizer.json` carries its own added-token table.
        """
        path = Path(path)
        if path.is_dir():
            if (path / VOCAB_FILENAME).is_file():
                path = path / VOCAB_FILENAME
            elif (path / HF_TOKENIZER_FILENAME).is_file():
                path = path / HF_TOKENIZER_FILENAME
            else:
                raise QwenkitError(
                    f"no {VOCAB_FILENAME} or {HF_TOKENIZER_FILENAME} in {path}: a checkpoint needs its tokenizer "
                    f"({VOCAB_FILENAME} ships with original Qwen checkpoints and the dashscope package, "
                    f"{HF_TOKENIZER_FILENAME} with Qwen1.5/2/2.5)"
                )
        elif not path.is_file():
            raise QwenkitError(
                f"vocabulary file {path} not found: pass the path of a {VOCAB_FILENAME} or "
                f"{HF_TOKENIZER_FILENAME} file, or of a checkpoint directory that contains one"
            )
        if path.suffix == ".json":
            from qwenkit.hf_tokenizer import read_hf_tokenizer

            return read_hf_tokenizer(path)
        return cls(load_vocab(path), special_tokens=special_tokens, path=path)

    @property
    def path(self) -> Path | None:
        """The vocabulary file this tokenizer was loaded from (None when built in memory)."""
        return self._path

    @property
    def kind(self) -> Literal["qwen.tiktoken", "tokenizer.json"]:
        """The file format the tokenizer came from: "qwen.tiktoken" or "tokenizer.json"."""
        return self._kind

    @property
    def n_bpe(self) -> int:
        """Number of BPE ranks; added (special) token ids start here."""
        return self._n_bpe

    @property
    def vocab_size(self) -> int:
        """Number of used ids: BPE ranks plus added tokens (151851 official, 151665 for Qwen2.5)."""
        return self._n_bpe + len(self._special_tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every added token, control or not: text -> id."""
        return dict(self._special_tokens)

    @property
    def control_tokens(self) -> frozenset[str]:
        """The added tokens flagged special (control tokens); all of them for `qwen.tiktoken`."""
        return self._control_tokens

    @property
    def normalized_tokens(self) -> frozenset[str]:
        """The added tokens matched after normalization (none for `qwen.tiktoken` and Qwen2.5)."""
        return self._normalized_tokens

    @property
    def pat_str(self) -> str:
        """The pre-tokenizer regex that splits text before BPE."""
        return self._pat_str

    @property
    def nfc(self) -> bool:
        """Whether text is NFC-normalized before encoding."""
        return self._nfc

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's Jinja chat template (tokenizer.json checkpoints), else None."""
        return self._chat_template

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @property
    def eod_id(self) -> int:
        return self._special_tokens[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        """The pad token's id; Qwen pads with `<|endoftext|>`."""
        return self._special_tokens[self._pad_token] if self._pad_token is not None else self.eod_id

    @property
    def im_start_id(self) -> int:
        return self._special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_tokens[IM_END]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self._path)!r}, kind={self._kind!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Encode `text` (NFC-normalized when the tokenizer says so).

        `allowed_special` ("all" or a set of added-token strings, control or not) lists the added
        tokens that become their ids; any other added-token text is encoded as plain text. Added
        tokens in `disallowed_special` ("all" = every one not allowed) raise QwenkitError instead.
        """
        return self.encode_batch([text], allowed_special, disallowed_special, num_threads=1)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
        num_threads: int = 8,
    ) -> list[list[int]]:
        """`encode` for many texts at once, on `num_threads` threads (tiktoken releases the GIL)."""
        allowed = self._all_names if allowed_special == "all" else self._all_names & set(allowed_special)
        disallowed = self._all_names - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            finder = _splitter(frozenset(disallowed))
            for text in texts:
                found = finder.search(text)
                if found:
                    raise QwenkitError(
                        f"text contains the added token {found.group()!r}, which is disallowed here "
                        "(list it in allowed_special, or leave it out of disallowed_special)"
                    )
        # As `tokenizers` does: added tokens are found in the raw text, then each plain piece is
        # normalized, the added tokens flagged `normalized` are found in it, and the rest goes to BPE.
        raw = allowed - self._normalized_tokens
        split_raw = _splitter(raw).split if raw else None
        in_normalized = {
            self._normalize(n): self._special_tokens[n] for n in allowed & self._normalized_tokens
        }
        split_normalized = _splitter(frozenset(in_normalized)).split if in_normalized else None
        items: list[list[str | int]] = []  # per text: plain (normalized) strings and added-token ids
        for text in texts:
            row: list[str | int] = []
            for k, part in enumerate(split_raw(text) if split_raw else [text]):
                if k % 2:
                    row.append(self._special_tokens[part])
                    continue
                part = self._normalize(part)
                for j, piece in enumerate(split_normalized(part) if split_normalized else [part]):
                    row.append(in_normalized[piece] if j % 2 else piece)
            items.append(row)
        plain = [item for row in items for item in row if isinstance(item, str)]
        if num_threads > 1 and len(plain) > 1:
            encoded = iter(self._enc.encode_ordinary_batch(plain, num_threads=num_threads))
        else:
            encoded = iter([self._enc.encode_ordinary(p) for p in plain])
        result = []
        for row in items:
            ids: list[int] = []
            for item in row:
                if isinstance(item, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(item)
            result.append(ids)
        return result

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids (list, 1-D tensor or array) -> text; incomplete UTF-8 becomes U+FFFD by default.

        `skip_special_tokens` drops the control tokens; other added tokens (`<tool_call>`) stay.
        """
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control_ids]
        return self._enc.decode_bytes(ids).decode("utf-8", errors=errors)

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (what `skip_special_tokens` drops)."""
        return token_id in self._control_ids

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; for an added token, its text in UTF-8."""
        (token_id,) = self._check_ids([token_id])
        return self._id_to_bytes[token_id]

    def save(self, path: str | Path) -> None:
        """Write the BPE ranks as a `qwen.tiktoken` file (added tokens follow implicitly: the
        `qwen.tiktoken` table, so a tokenizer.json tokenizer is saved with `hf_tokenizer` instead)."""
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
        if self.skip_special_tokens and self.tokenizer.is_control(token_id):
            return ""
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return the rest, with U+FFFD for an incomplete trailing character."""
        return self._utf8.decode(b"", final=True)
