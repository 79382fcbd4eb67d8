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
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from qwenkit.chatml import CHAT_TEMPLATE
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import ENDOFTEXT, PAT_STR, Tokenizer


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
    merges = [(unicode_of(a), unicode_of(b)) for a, b in derive_merges(ranks)]
    hf = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, token_id in specials:  # added tokens take the ids after the vocabulary, in order
        if hf.token_to_id(name) != token_id:
            raise QwenkitError(f"special token {name} got id {hf.token_to_id(name)}, expected {token_id}")
    return hf


@lru_cache(maxsize=4)
def tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json contents, built once per tokenizer object (deriving merges takes seconds)."""
    return build_hf_tokenizer(tokenizer).to_str()


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    directory: Path,
    eos_token: str = ENDOFTEXT,
    model_max_length: int = 8192,
) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `tokenizer` into `directory`.

    `eos_token` defaults to `<|endoftext|>` (base models); chat checkpoints may pass `<|im_end|>`.
    Padding uses `<|endoftext|>`; there is no BOS token.
    """
    special = tokenizer.special_tokens
    if eos_token not in special:
        raise QwenkitError(f"eos_token {eos_token!r} is not a special token of this tokenizer")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(token_id): {
                "content": name,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for name, token_id in sorted(special.items(), key=lambda item: item[1])
        },
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
