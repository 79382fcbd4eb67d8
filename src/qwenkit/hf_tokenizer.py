"""Export a qwenkit tokenizer as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`).

transformers' `AutoTokenizer` and vLLM read these, not `qwen.tiktoken`. The result is what the
Qwen2 family ships: byte-level BPE over the same vocabulary, pre-tokenized with the same regex
after NFC normalization, with the special tokens added after the last BPE rank. Known difference:
`tokenizers`' NFC uses older Unicode tables than Python's, so a few combining marks new in
Unicode 14 (e.g. U+1AC0, U+0899) written out of canonical order may be reordered differently.

tiktoken stores only ranks; Hugging Face BPE needs merges. The merge of the token of rank `r` is
the pair of parts that BPE over its bytes reaches when only merges of rank < r are allowed.
"""

from __future__ import annotations

import json
import weakref
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from qwenkit.chatml import CHAT_TEMPLATE
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Written out here because `tokenizers` does not expose the mapping (only its alphabet).
    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE over `token`'s bytes using only merges whose result has rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges implied by tiktoken ranks, in rank order (one per multi-byte token).

    Raises QwenkitError for a token that BPE limited to lower ranks does not build from exactly two
    parts (Hugging Face BPE could never produce it). About a second for the official vocabulary.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise QwenkitError(
                f"vocabulary token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens "
                f"(BPE gives {len(parts)} parts), so it has no Hugging Face BPE merge"
            )
        merges.append((parts[0], parts[1]))
    return merges


def build_hf_tokenizer(tokenizer: Tokenizer, ranks: dict[bytes, int] | None = None) -> HFTokenizer:
    """The `tokenizers.Tokenizer` equivalent of `tokenizer` (`ranks`: its BPE vocabulary, if at hand)."""
    if ranks is None:
        ranks = {tokenizer.token_bytes(rank): rank for rank in range(tokenizer.n_bpe)}
    to_unicode = bytes_to_unicode()

    def unicode_of(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {unicode_of(token): rank for token, rank in ranks.items()}
    merges = _READ_MERGES.get(tokenizer)  # a tokenizer.json tokenizer's own (checked) merges
    if merges is None:
        merges = [(unicode_of(a), unicode_of(b)) for a, b in derive_merges(ranks)]
    hf = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    if tokenizer.nfc:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    control = tokenizer.control_tokens
    for name, token_id in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]):
        # One at a time, in id order: added tokens take the ids after the vocabulary.
        normalized = name in tokenizer.normalized_tokens
        hf.add_tokens([AddedToken(name, special=name in control, normalized=normalized)])
        if hf.token_to_id(name) != token_id:
            raise QwenkitError(f"added token {name} got id {hf.token_to_id(name)}, expected {token_id}")
    return hf


@lru_cache(maxsize=4)
def tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json contents, built once per tokenizer object (deriving merges takes seconds)."""
    return build_hf_tokenizer(tokenizer).to_str()


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    directory: Path,
    eos_token: str | None = None,
    model_max_length: int = 8192,
) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `tokenizer` into `directory`.

    A tokenizer read from tokenizer.json writes back its own added-token table (with special flags),
    eos/bos/pad and chat template. A `qwen.tiktoken` one gets qwenkit's: every added token special,
    eos `<|endoftext|>` (base models; chat checkpoints pass `<|im_end|>`), pad `<|endoftext|>`, no BOS,
    and qwenkit's ChatML template. `eos_token`, when given, overrides the eos either way.
    """
    own = tokenizer.kind == "tokenizer.json"
    special = tokenizer.special_tokens
    if eos_token is None:
        eos_token = tokenizer.eos_token if own else ENDOFTEXT
    elif eos_token not in special:
        raise QwenkitError(f"eos_token {eos_token!r} is not a special token of this tokenizer")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": tokenizer.bos_token if own else None,
        "eos_token": eos_token,
        "pad_token": tokenizer.pad_token if own else ENDOFTEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "add_prefix_space": False,
        "chat_template": tokenizer.chat_template if own else CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(token_id): {
                "content": name,
                "lstrip": False,
                "rstrip": False,
                "normalized": name in tokenizer.normalized_tokens,
                "single_word": False,
                "special": name in tokenizer.control_tokens,
            }
            for name, token_id in sorted(special.items(), key=lambda item: item[1])
        },
    }
    if config["chat_template"] is None:
        del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


# --- Reading tokenizer.json (Qwen1.5/2/2.5 checkpoints) into a tiktoken-backed Tokenizer.
# Parsed from the JSON by hand: `tokenizers`' Python API exposes neither the merges nor the Split pattern.


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenkitError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise QwenkitError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_name(value, field: str, file: Path) -> str | None:
    """eos/bos/pad in tokenizer_config.json: a string, {"content": ...} (an AddedToken) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise QwenkitError(f"{file}: {field} must be a string, {{'content': string}} or null")
    return value


def _read_chat_template(directory: Path, config: dict, config_file: Path) -> str | None:
    """The template transformers would use: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or the "default" one of a list of named templates), else chat_template.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise QwenkitError(
                f"{config_file}: chat_template is a list of named templates without a 'default'"
            )
        template = named["default"]
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
        config_file = directory / "chat_template.json"
    if template is not None and not isinstance(template, str):
        raise QwenkitError(f"{config_file}: chat_template must be a string")
    return template


def _expect(value, expected, field: str, file: Path) -> None:
    if value not in expected:
        want = " or ".join(repr(e) for e in expected)
        raise QwenkitError(f"{file}: {field} {value!r} is not supported (qwenkit reads {want})")


def _read_pre_tokenizer(pre, file: Path) -> str:
    """The Split regex of Qwen's pre-tokenizer: Sequence[Split(Regex, Isolated), ByteLevel(no regex)]."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2 or not all(isinstance(s, dict) for s in steps):
        shape = pre.get("type") if isinstance(pre, dict) else pre
        raise QwenkitError(
            f"{file}: pre_tokenizer {shape!r} is not supported "
            "(qwenkit reads Sequence[Split(Regex, Isolated), ByteLevel], as Qwen2 ships)"
        )
    split, byte_level = steps
    _expect(split.get("type"), ("Split",), "pre_tokenizer.pretokenizers[0].type", file)
    pattern = split.get("pattern")
    if not isinstance(pattern, dict) or not isinstance(pattern.get("Regex"), str):
        raise QwenkitError(f"{file}: pre_tokenizer.pretokenizers[0].pattern must be {{'Regex': string}}")
    _expect(split.get("behavior"), ("Isolated",), "pre_tokenizer.pretokenizers[0].behavior", file)
    _expect(split.get("invert"), (False,), "pre_tokenizer.pretokenizers[0].invert", file)
    _expect(byte_level.get("type"), ("ByteLevel",), "pre_tokenizer.pretokenizers[1].type", file)
    _expect(
        byte_level.get("add_prefix_space"), (False,), "pre_tokenizer.pretokenizers[1].add_prefix_space", file
    )
    _expect(byte_level.get("use_regex"), (False,), "pre_tokenizer.pretokenizers[1].use_regex", file)
    return pattern["Regex"]


def _read_normalizer(normalizer, file: Path) -> bool:
    """True for NFC, False for none (also a Sequence of at most one NFC)."""
    if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
        inner = normalizer.get("normalizers")
        if isinstance(inner, list) and len(inner) <= 1:
            return bool(inner) and _read_normalizer(inner[0], file)
    if normalizer is None:
        return False
    if isinstance(normalizer, dict) and normalizer.get("type") == "NFC":
        return True
    kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    raise QwenkitError(f"{file}: normalizer {kind!r} is not supported (qwenkit reads 'NFC' or none)")


def _read_bpe(model, file: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[bytes, int]]:
    """The byte-level BPE model: vocab and merges as written (GPT-2's byte characters), and the
    vocabulary as tiktoken ranks {token bytes: id}."""
    if not isinstance(model, dict):
        raise QwenkitError(f"{file}: model must be an object")
    _expect(model.get("type"), ("BPE",), "model.type", file)
    _expect(model.get("byte_fallback", False), (False,), "model.byte_fallback", file)
    _expect(model.get("dropout"), (None,), "model.dropout", file)
    _expect(model.get("continuing_subword_prefix") or "", ("",), "model.continuing_subword_prefix", file)
    _expect(model.get("end_of_word_suffix") or "", ("",), "model.end_of_word_suffix", file)
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise QwenkitError(f"{file}: model.vocab must be an object and model.merges a list")
    # GPT-2 character -> byte (as a Latin-1 character); other characters below 256 -> U+FFFF, which
    # Latin-1 cannot encode, so a token outside the byte-level alphabet fails to encode.
    table = {ord(char): chr(byte) for byte, char in bytes_to_unicode().items()}
    table.update({code: "\uffff" for code in range(256) if code not in table})
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise QwenkitError(f"{file}: model.vocab[{token!r}] must be an integer id")
        try:
            ranks[token.translate(table).encode("latin-1")] = token_id
        except UnicodeEncodeError:
            raise QwenkitError(f"{file}: model.vocab token {token!r} is not a byte-level BPE token") from None
    pairs: list[tuple[str, str]] = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise QwenkitError(f"{file}: model.merges[{i}] {merge!r} is not a pair of tokens")
        pairs.append((parts[0], parts[1]))
    return vocab, pairs, ranks


def check_merges(vocab: dict[str, int], merges: list[tuple[str, str]], file: Path) -> None:
    """Refuse merges that tiktoken's rank-ordered BPE cannot reproduce.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank (id), so a merge list
    agrees with it when merges come in the order of their results' ids, both parts rank below the
    result, and every multi-byte token has the merge that rank-ordered BPE reaches for it
    (`derive_merges`). Extra merges splitting a token differently are allowed (transformers' tiktoken
    converter writes every split). The last condition holds exactly when BPE with these merges turns
    each vocabulary token back into itself, which `tokenizers` checks for the whole vocabulary at once.
    """
    last = -1
    for i, (left, right) in enumerate(merges):
        rank = vocab.get(left + right)
        text = f"{file}: model.merges[{i}] ({left!r}, {right!r})"
        if rank is None:
            raise QwenkitError(f"{text} makes a token that is not in model.vocab")
        if rank < last or vocab.get(left, rank) >= rank or vocab.get(right, rank) >= rank:
            raise QwenkitError(
                f"{text} is out of rank order, so tiktoken's BPE cannot reproduce this vocabulary"
            )
        last = rank
    # One pass over the whole vocabulary: byte-level tokens never contain U+0020, so joined with
    # spaces and split on whitespace, each token is its own word for BPE.
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokens = sorted((t for t in vocab if len(t) > 1), key=vocab.__getitem__)
    if bpe.encode(" ".join(tokens), add_special_tokens=False).ids == [vocab[t] for t in tokens]:
        return
    for token in tokens:  # only to name the first token BPE does not rebuild
        if bpe.encode(token, add_special_tokens=False).ids == [vocab[token]]:
            continue
        parts = _bpe_parts(vocab, token, vocab[token])
        if len(parts) != 2:
            raise QwenkitError(
                f"{file}: model.vocab token {token!r} (id {vocab[token]}) is not the merge of two "
                f"lower-ranked tokens (BPE gives {len(parts)} parts), so tiktoken cannot reproduce this vocabulary"
            )
        raise QwenkitError(
            f"{file}: model.merges lacks ({parts[0]!r}, {parts[1]!r}), the merge rank-ordered BPE uses for "
            f"token {token!r} (id {vocab[token]}), so tiktoken cannot reproduce this vocabulary"
        )


def _read_added_tokens(data: dict, config: dict, n_bpe: int, file: Path, config_file: Path):
    """Added tokens of tokenizer.json (plus any only in tokenizer_config.json's added_tokens_decoder,
    which transformers adds too) -> (names in id order, names flagged special, names flagged normalized)."""
    table: dict[int, tuple[str, bool]] = {}
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list):
        raise QwenkitError(f"{file}: added_tokens must be a list")
    for i, entry in enumerate(entries):
        field = f"added_tokens[{i}]"
        if not isinstance(entry, dict):
            raise QwenkitError(f"{file}: {field} must be an object")
        token_id, content = entry.get("id"), entry.get("content")
        if not isinstance(token_id, int) or not isinstance(content, str) or not content:
            raise QwenkitError(f"{file}: {field} needs an integer id and a non-empty content string")
        for flag in ("lstrip", "rstrip", "single_word"):
            if entry.get(flag, False):
                raise QwenkitError(f"{file}: {field}.{flag} true is not supported ({content!r})")
        table[token_id] = (content, bool(entry.get("special", False)), bool(entry.get("normalized", False)))
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise QwenkitError(f"{config_file}: added_tokens_decoder must be an object")
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(content, str) or not content:
            raise QwenkitError(
                f"{config_file}: added_tokens_decoder[{key!r}] needs a numeric key and a content"
            )
        flags = (bool(entry.get("special", False)), bool(entry.get("normalized", False)))
        known = table.setdefault(int(key), (content, *flags))
        if known[0] != content:
            raise QwenkitError(
                f"{config_file}: added_tokens_decoder[{key!r}] is {content!r} but {file.name} has {known[0]!r}"
            )
    ids = sorted(table)
    if ids != list(range(n_bpe, n_bpe + len(ids))):
        bad = next(i for k, i in enumerate(ids) if i != n_bpe + k)
        raise QwenkitError(
            f"{file}: added_tokens: id {bad} ({table[bad][0]!r}) does not follow the BPE vocabulary "
            f"(qwenkit needs added tokens at ids {n_bpe}.. in a row)"
        )
    names = [table[i][0] for i in ids]
    if len(set(names)) != len(names):
        raise QwenkitError(f"{file}: added_tokens: a token appears twice")
    control = {name for name, special, _ in table.values() if special}
    return names, control, {name for name, _, normalized in table.values() if normalized}


_CHECKED_MERGES: set[tuple[str, int, int]] = set()
# The merges each tokenizer read from tokenizer.json came with, written back by build_hf_tokenizer
# (deriving them again from the ranks takes seconds).
_READ_MERGES: weakref.WeakKeyDictionary[Tokenizer, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def read_hf_tokenizer(file: str | Path) -> Tokenizer:
    """Load a Hugging Face `tokenizer.json` (+ `tokenizer_config.json` beside it) as a qwenkit Tokenizer.

    Reads the byte-level BPE vocabulary and merges (checked against tiktoken's rank order), the Split
    regex, the normalizer (NFC or none), the added-token table with its special flags, eos/bos/pad and
    the chat template; anything else (other models, byte fallback, other pre-tokenizers) is refused
    with the field named. About two seconds for a 151k vocabulary, half of it the merge check.
    """
    file = Path(file)
    data = _read_json(file)
    config_file = file.parent / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    vocab, merges, ranks = _read_bpe(data.get("model"), file)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise QwenkitError(f"{file}: model.vocab ids must be exactly 0..{len(ranks) - 1}, each used once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise QwenkitError(f"{file}: model.vocab lacks some of the 256 single-byte tokens")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED_MERGES:  # the check is most of the load time; a file passes once per process
        check_merges(vocab, merges, file)
        _CHECKED_MERGES.add(key)
    pat_str = _read_pre_tokenizer(data.get("pre_tokenizer"), file)
    nfc = _read_normalizer(data.get("normalizer"), file)
    decoder = data.get("decoder")
    _expect(
        decoder.get("type") if isinstance(decoder, dict) else decoder, ("ByteLevel",), "decoder.type", file
    )
    post = data.get("post_processor")
    _expect(
        post.get("type") if isinstance(post, dict) else post, ("ByteLevel", None), "post_processor.type", file
    )
    names, control, normalized = _read_added_tokens(data, config, len(ranks), file, config_file)
    for required in (ENDOFTEXT, IM_START, IM_END):
        if required not in names:
            raise QwenkitError(f"{file}: added_tokens lacks {required}, which Qwen's chat format needs")
    tokens = {
        field: _token_name(config.get(field), field, config_file)
        for field in ("eos_token", "bos_token", "pad_token")
    }
    for field, name in tokens.items():
        if name is not None and name not in names:
            raise QwenkitError(f"{config_file}: {field} {name!r} is not one of the added tokens")
    tokenizer = Tokenizer(
        ranks,
        special_tokens=names,
        path=file,
        control_tokens=frozenset(control),
        normalized_tokens=frozenset(normalized),
        pat_str=pat_str,
        nfc=nfc,
        kind="tokenizer.json",
        chat_template=_read_chat_template(file.parent, config, config_file),
        **tokens,
    )
    _READ_MERGES[tokenizer] = merges
    return tokenizer
