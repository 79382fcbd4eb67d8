"""QwenConfig: the shape and switches of one Qwen network, plus named presets.

Sizes follow the Qwen2 naming (``intermediate_size`` is the real FFN width); the original Qwen
layout stores twice that number, and ``checkpoint.py`` converts when reading it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwenkit.errors import QwenkitError


@dataclass
class QwenConfig:
    vocab_size: int = 151936  # embedding rows (151,851 ids used, the rest padding)
    hidden_size: int = 4096
    intermediate_size: int = 11008  # real SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no grouped-query attention)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 8192  # training length S ("seq_length" in the original config)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Long-context inference switches (never active while training), report §2.5 / §3 of QWEN_REFERENCE.
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    use_window_attn: bool = False
    window_sizes: list[int] | None = None  # one per layer; None = default_window_sizes()
    # int8 KV cache (the original's switch of the same name): see model.quantize_kv.
    use_cache_quantization: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise QwenkitError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenkitError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise QwenkitError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.window_sizes is not None and len(self.window_sizes) != self.num_hidden_layers:
            raise QwenkitError(
                f"window_sizes has {len(self.window_sizes)} entries for {self.num_hidden_layers} layers"
            )

    def default_window_sizes(self) -> list[int]:
        """Layer-wise windows, shorter for lower layers (report §2.5).

        With training length S: the lowest eighth of the layers sees S tokens, the next eighth 2S,
        the rest 4S. For Qwen-7B trained at 2048 (32 layers) this is the maintainers' description:
        4 layers at 2048, 4 at 4096, 24 at 8192.
        """
        n, s = self.num_hidden_layers, self.max_position_embeddings
        low = max(n // 8, 1)
        return [s if i < low else 2 * s if i < 2 * low else 4 * s for i in range(n)]

    def layer_window_sizes(self) -> list[int]:
        return list(self.window_sizes) if self.window_sizes is not None else self.default_window_sizes()

    @property
    def num_parameters(self) -> int:
        """Parameter count of the network this config describes (embedding padding rows included)."""
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = h * (q + 2 * kv) + (q + 2 * kv) + q * h
        block = attention + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * block + h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QwenConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QwenkitError(f"unknown QwenConfig keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> QwenConfig:
        if name not in PRESETS:
            raise QwenkitError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _qwen1(hidden: int, layers: int, heads: int, ffn: int, vocab: int, seq: int, base: float, long: bool):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=seq,
        rope_theta=base,
        use_dynamic_ntk=long,
        use_logn_attn=long,
    )


def _qwen2(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool):
    return dict(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
    )


# Qwen (v1) shapes from the official configs; Qwen2.5 shapes for the Qwen2-family layout.
PRESETS: dict[str, dict] = {
    "qwen-1.8b": _qwen1(2048, 24, 16, 5504, 151936, 8192, 10000.0, True),
    "qwen-7b": _qwen1(4096, 32, 32, 11008, 151936, 8192, 10000.0, True),
    "qwen-14b": _qwen1(5120, 40, 40, 13696, 152064, 2048, 10000.0, True),
    "qwen-72b": _qwen1(8192, 80, 64, 24576, 152064, 32768, 1000000.0, False),
    "qwen2.5-0.5b": _qwen2(896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": _qwen2(1536, 28, 12, 2, 8960, True),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944, False),
    # Tiny shapes for tests and CPU experiments (full official vocabulary so real token ids work).
    "tiny": dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "tiny-gqa": dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}
