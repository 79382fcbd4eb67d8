"""The Qwen network in one file.

Pre-norm decoder blocks (report §2.2): RMSNorm in fp32, rotary embeddings computed in fp32,
attention with bias on Q/K/V and grouped-query support, SwiGLU MLP, untied output head.
Inference-only long-context switches (report §2.5): dynamic NTK, LogN query scaling and
layer-wise window attention. Module names follow transformers' Qwen2 layout so state dicts,
peft adapters and checkpoints are interchangeable with it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import math
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from qwenkit.chatml import DEFAULT_SYSTEM
from qwenkit.config import QwenConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def ntk_alpha(length: int, training_length: int) -> float:
    """Dynamic NTK factor as the original computes it at prefill: 1 up to S, 3 up to 2S, 7 up to 4S."""
    context_value = math.log(length / training_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_scale(positions: torch.Tensor, training_length: int) -> torch.Tensor:
    """LogN query factor for 0-based positions: log(i)/log(S) for 1-based i beyond S, else 1."""
    i = (positions + 1).double()
    return torch.where(i > training_length, i.log() / math.log(training_length), torch.ones_like(i))


def rotary_inv_freq(head_dim: int, base: float, alphas: list[float], device=None) -> torch.Tensor:
    """Inverse frequencies [B, head_dim/2] in fp32, the base NTK-scaled by each row's alpha."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    per_alpha = {a: 1.0 / ((base * a ** (head_dim / (head_dim - 2))) ** exponents) for a in set(alphas)}
    return torch.stack([per_alpha[a] for a in alphas])


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, head_dim] in fp32 for positions [B, T]."""
    freqs = positions.to(torch.float32)[:, :, None] * inv_freq[:, None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """Rotate x [B, H, T, D] (heads at dimension `head_dim`: 2 for [B, T, H, D]) by half-split RoPE in
    fp32 and cast back (rotate_half = cat(-x2, x1)); cos/sin are [B, T, D]."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(head_dim), sin.unsqueeze(head_dim)
    return (x32 * cos + rotated * sin).to(x.dtype)


INT8_PARAM_BYTES = 4  # after each token's int8 levels: its fp16 scale and fp16 minimum
DEQUANTIZE_BLOCK_BYTES = 64 * 2**20  # float keys + values made at once when reading an int8 cache


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values [..., D] -> uint8 records [..., D + 4]: each vector's D levels 0..255, then its
    fp16 scale and minimum, so that x ~= scale * level + minimum (asymmetric, one group per token
    and head).

    The original's use_cache_quantization (modeling_qwen.py `quantize_cache_v`) has the same grid:
    scale = (max - min) / 255, zero = -min / scale, x ~= scale * (level - zero). It takes max and
    min over every token of one call per head (per token while decoding, the whole prompt at
    prefill) and truncates; qwenkit groups per token always (the result does not depend on how a
    prompt is split into calls) and rounds to the nearest level.
    """
    x32 = x.float()
    low, high = x32.amin(dim=-1, keepdim=True), x32.amax(dim=-1, keepdim=True)
    fp16 = torch.finfo(torch.float16)
    scale = ((high - low) / 255).clamp(fp16.tiny, fp16.max).half()  # tiny: a constant vector
    low = low.clamp(-fp16.max, fp16.max).half()
    levels = ((x32 - low.float()) / scale.float()).round_().clamp_(0, 255).to(torch.uint8)
    return torch.cat((levels, torch.cat((scale, low), dim=-1).view(torch.uint8)), dim=-1)


def dequantize_kv(records: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 records [..., D + 4] (quantize_kv) -> float [..., D] in `dtype`."""
    d = records.shape[-1] - INT8_PARAM_BYTES
    params = records[..., d:].view(torch.float16).to(dtype)  # [..., 2]: scale, minimum
    return records[..., :d].to(dtype).mul_(params[..., :1]).add_(params[..., 1:])  # one new tensor


def attend_int8(
    q: torch.Tensor,
    key_records: torch.Tensor,
    value_records: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    enable_gqa: bool,
) -> torch.Tensor:
    """SDPA over an int8 cache's records, dequantized a block of rows at a time so that about
    DEQUANTIZE_BLOCK_BYTES of float keys and values exist at once (long contexts, big batches)."""
    b = q.shape[0]
    row_bytes = 2 * key_records[0, ..., :-INT8_PARAM_BYTES].numel() * 4
    step = max(1, DEQUANTIZE_BLOCK_BYTES // max(row_bytes, 1))
    outs = []
    for start in range(0, b, step):
        rows = slice(start, start + step)
        k, v = dequantize_kv(key_records[rows], q.dtype), dequantize_kv(value_records[rows], q.dtype)
        block_mask = mask[rows] if mask is not None and mask.shape[0] == b else mask
        outs.append(
            F.scaled_dot_product_attention(
                q[rows], k, v, attn_mask=block_mask, is_causal=is_causal, enable_gqa=enable_gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class KVCache:
    """Preallocated keys/values for every layer, plus what decoding must remember.

    Two ways of filling it. `Qwen.forward` fills slots left to right for all rows at once (prompts
    are left-padded), so one integer `length` tells how many are in use; that is a prefill.
    `Qwen.decode_step` instead writes each row at its own device-side `slot`, so rows of different
    lengths decode together (CUDA graphs; the rows of `qwenkit.generation.BatchDecoder`): `insert`
    moves prefilled prompts into such rows. `positions` holds each slot's real position (-1 for
    padding) and `inv_freq` the rotary frequencies with the dynamic-NTK factor fixed at prefill, as
    the original does. Each layer's keys and values are tensors of their own, so `resize` can
    reallocate one at a time (a budgeted server grows its cache while rows run).

    With `config.use_cache_quantization` (the original's int8 KV cache) each slot holds a uint8
    record of D levels + fp16 scale and minimum per head (`quantize_kv`) instead of D floats of
    `dtype`; every operation here copies records as it copies floats, and attention reads them
    through `dequantize_kv`.
    """

    def __init__(self, config: QwenConfig, batch_size: int, max_length: int, device, dtype):
        self.quantized = config.use_cache_quantization
        self.dtype = dtype  # what attention computes in (and, unquantized, what is stored)
        width = config.head_dim + INT8_PARAM_BYTES if self.quantized else config.head_dim
        shape = (batch_size, config.num_key_value_heads, max_length, width)
        stored = torch.uint8 if self.quantized else dtype
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, device=device, dtype=stored) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=stored) for _ in layers]
        self.positions = torch.full((batch_size, max_length), -1, dtype=torch.long, device=device)
        self.head_dim = config.head_dim
        self.inv_freq: torch.Tensor | None = None
        self.slot: torch.Tensor | None = None  # [B] write slot of each row, for decode_step
        self.next_position: torch.Tensor | None = None  # [B, 1] position of each row's next token
        self.padded = False
        self.length = 0
        self.max_length = max_length

    @staticmethod
    def size_in_bytes(config: QwenConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        """Bytes a cache of `batch_size` rows x `max_length` slots holds once decoding (`nbytes`)."""
        if config.use_cache_quantization:  # uint8 levels + fp16 scale and minimum per token and head
            per_head = config.head_dim + INT8_PARAM_BYTES
        else:
            per_head = config.head_dim * dtype.itemsize
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * per_head
        per_token += 8  # keys and values of every layer, the int64 position
        per_row = 8 + 8 + (config.head_dim // 2) * 4  # slot, next position, fp32 rotary frequencies
        return batch_size * (max_length * per_token + per_row)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache's tensors (a view counts the whole of what it sees)."""
        tensors = [*self.keys, *self.values, self.positions, self.inv_freq, self.slot, self.next_position]
        return sum(t.nbytes for t in tensors if t is not None)

    def resize(self, batch_size: int, max_length: int) -> None:
        """Reallocate for `batch_size` rows x `max_length` slots, keeping the rows and slots both shapes
        share (new ones are empty). One tensor at a time: while it runs, the old tensors not yet
        replaced and the new ones together hold at most one old layer's keys (or values) more than
        the new cache."""
        rows, slots = min(self.batch_size, batch_size), min(self.max_length, max_length)

        for tensors in (self.keys, self.values):
            for i in range(len(tensors)):
                old = tensors[i]
                new = old.new_zeros((batch_size, old.shape[1], max_length, old.shape[3]))
                new[:rows, :, :slots] = old[:rows, :, :slots]
                tensors[i] = new
                del old  # freed now, before the next layer's new tensor is made
        positions = torch.full((batch_size, max_length), -1, dtype=torch.long, device=self.positions.device)
        positions[:rows, :slots] = self.positions[:rows, :slots]
        self.positions = positions
        for name in ("inv_freq", "slot", "next_position"):
            old = getattr(self, name)
            if old is not None:
                new = old.new_zeros((batch_size, *old.shape[1:]))
                new[:rows] = old[:rows]
                setattr(self, name, new)
        self.max_length = max_length

    def next_positions(self) -> torch.Tensor:
        """Positions [B, 1] of the token that follows what is cached."""
        return self.positions[:, : self.length].max(dim=1, keepdim=True).values + 1

    def insert(self, rows: Sequence[int], prefilled: KVCache) -> None:
        """Move the prompts of a prefilled cache (left-padded, as `Qwen.forward` fills it) into
        `rows` of this one, each from slot 0, ready for `Qwen.decode_step`."""
        device = self.positions.device
        if self.slot is None:
            batch = self.positions.shape[0]
            self.slot = torch.zeros(batch, dtype=torch.long, device=device)
            self.next_position = torch.zeros((batch, 1), dtype=torch.long, device=device)
            self.inv_freq = torch.zeros((batch, self.head_dim // 2), device=device)
        width = prefilled.length
        lengths = (prefilled.positions[:, :width] >= 0).sum(dim=1)
        pairs = list(zip((*self.keys, *self.values), (*prefilled.keys, *prefilled.values), strict=True))
        for i, (row, n) in enumerate(zip(rows, lengths.tolist(), strict=True)):
            for mine, theirs in pairs:
                mine[row, :, :n] = theirs[i, :, width - n : width]
        index = torch.tensor(list(rows), device=device)
        slots = torch.arange(self.max_length, device=device)
        lengths = lengths.to(device)
        self.positions[index] = torch.where(slots < lengths[:, None], slots, -1)
        self.slot[index] = lengths
        self.next_position[index] = lengths[:, None]
        self.inv_freq[index] = prefilled.inv_freq

    def park(self, rows: Sequence[int]) -> None:
        """Rows not in use: the next `decode_step` writes their (dummy) token at slot 0, so a row
        that is decoded while empty never runs past the end of the cache."""
        self.slot[list(rows)] = 0
        self.next_position[list(rows)] = 0

    @contextlib.contextmanager
    def rollback(self) -> Iterator[None]:
        """Decoding steps run inside leave every row's slot and positions as they were; the keys and
        values they wrote stay masked until overwritten (warming up before a CUDA graph capture)."""
        saved = self.slot.clone(), self.next_position.clone(), self.positions.clone()
        try:
            yield
        finally:
            for tensor, value in zip((self.slot, self.next_position, self.positions), saved, strict=True):
                tensor.copy_(value)

    def first_rows(self, n: int) -> KVCache:
        """A view of rows [0, n) sharing this cache's storage: decode only the rows in use."""
        view = copy.copy(self)
        view.keys, view.values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        view.positions = self.positions[:n]
        for name in ("inv_freq", "slot", "next_position"):
            if getattr(self, name) is not None:
                setattr(view, name, getattr(self, name)[:n])
        return view


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        query_scale: torch.Tensor | None,
        cache: KVCache | None,
        qkv_proj: nn.Module | None = None,
    ) -> torch.Tensor:
        """`qkv_proj` (decoding only): q_proj, k_proj and v_proj fused into one layer (FusedProjections)."""
        b, t, _ = x.shape
        if qkv_proj is not None:  # decoding: one product for q, k and v, RoPE on q and k at once
            heads = qkv_proj(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            qk = apply_rotary(heads[:, :, : self.num_heads + self.num_kv_heads], *rope, head_dim=2)
            q, k = qk[:, :, : self.num_heads].transpose(1, 2), qk[:, :, self.num_heads :].transpose(1, 2)
            v = heads[:, :, self.num_heads + self.num_kv_heads :].transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if query_scale is not None:  # LogN scaling, after RoPE
            q = (q.float() * query_scale[:, None, :, None]).to(q.dtype)
        quantized = cache is not None and cache.quantized
        if quantized:  # int8 cache: records written and read in place of floats, attended below
            k, v = quantize_kv(k), quantize_kv(v)
        if cache is not None and cache.slot is not None:  # decode_step: each row writes at its own slot
            rows = torch.arange(b, device=x.device)
            cache.keys[self.layer_index][rows, :, cache.slot] = k[:, :, 0]
            cache.values[self.layer_index][rows, :, cache.slot] = v[:, :, 0]
            width = mask.shape[-1]  # the slots decode_step's mask covers
            k, v = cache.keys[self.layer_index][:, :, :width], cache.values[self.layer_index][:, :, :width]
        elif cache is not None:
            start, end = cache.length, cache.length + t
            cache.keys[self.layer_index][:, :, start:end] = k
            cache.values[self.layer_index][:, :, start:end] = v
            k = cache.keys[self.layer_index][:, :, :end]
            v = cache.values[self.layer_index][:, :, :end]
        gqa = self.num_kv_heads != self.num_heads
        if quantized:
            out = attend_int8(q, k, v, mask, is_causal, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the original's w2 is the gate, w1 the up projection."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, gate_up_proj: nn.Module | None = None) -> torch.Tensor:
        """`gate_up_proj` (decoding only): gate_proj and up_proj fused into one layer."""
        if gate_up_proj is not None:
            gate, up = gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, is_causal, query_scale, cache):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, query_scale, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, x, rope, mask, query_scale, cache, fused: FusedProjections):
        """forward for one decoding step without autograd: the fused projections, residuals added in place."""
        x = x.add_(self.self_attn(self.input_layernorm(x), rope, mask, False, query_scale, cache, fused.qkv))
        return x.add_(self.mlp(self.post_attention_layernorm(x), fused.gate_up))


class FusedLinear(nn.Module):
    """nn.Linear layers that read the same input as one matrix: y = cat([layer(x) for layer], -1)."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        weight = torch.cat([layer.weight.detach() for layer in layers])
        self.register_buffer("weight", cpu_decode_layout(weight) if weight.device.type == "cpu" else weight)
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b.detach() if b is not None else weight.new_zeros(layer.out_features)
                 for b, layer in zip(biases, layers, strict=True)]
            )  # fmt: skip
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fuse_projections(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One layer computing torch.cat([layer(x) for layer in layers], -1), or None when they cannot be
    fused. Plain nn.Linear layers become a FusedLinear; packed and 16-bit ones are fused by
    qwenkit.quant.linear. Every tensor of a layer that holds one row per output (weight, bias, packed
    levels, scales) is then made a view of the fused layer's: nothing is held twice, and an in-place
    update of a layer (training, load_state_dict) is seen by the fused one."""
    with torch.inference_mode(False), torch.no_grad():  # the layers' tensors must stay usable by autograd
        first = layers[0]
        if all(type(layer) is nn.Linear for layer in layers):
            same = all(
                layer.weight.dtype == first.weight.dtype
                and layer.weight.device == first.weight.device
                and layer.in_features == first.in_features
                for layer in layers
            )
            fused = FusedLinear(layers) if same else None
        else:
            from qwenkit.quant import linear  # packed / 16-bit layers (fuse_linears: their own layout)

            fuse = getattr(linear, "fuse_linears", None)
            fused = fuse(list(layers)) if fuse is not None else None
        if fused is not None:
            _share_rows(fused, layers)
    return fused


def _share_rows(fused: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Make each layer tensor with one row per output a view of the fused layer's same-named tensor."""
    total = sum(layer.out_features for layer in layers)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        start += layer.out_features
        for store in (layer._parameters, layer._buffers):
            for name, mine in store.items():
                whole = getattr(fused, name, None)
                if (
                    mine is None
                    or not isinstance(whole, torch.Tensor)
                    or whole.dim() == 0
                    or whole.shape[0] != total
                    or mine.shape[0] != layer.out_features
                    or mine.shape[1:] != whole.shape[1:]
                    or mine.dtype != whole.dtype
                ):
                    continue
                if isinstance(mine, nn.Parameter):
                    mine.data = whole[rows]
                else:
                    store[name] = whole[rows]


class FusedProjections:
    """One block's layers that read the same input, fused for decoding: q/k/v as `qkv`, gate/up as
    `gate_up` (None where they cannot be fused). `current` says whether the block still holds the
    layers and tensors that were fused (a cast, a move, a replaced layer or an in-place update to a
    layer that does not share the fused rows mean: fuse again)."""

    def __init__(self, block: Block):
        self.layers = self._layers(block)
        self.qkv = fuse_projections(self.layers[:3])
        self.gate_up = fuse_projections(self.layers[3:])
        self.state = self._state(self.layers)

    @staticmethod
    def _layers(block: Block) -> list[nn.Module]:
        attn, mlp = block.self_attn, block.mlp
        return [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]

    @staticmethod
    def _state(layers: list[nn.Module]) -> list[tuple]:
        """(dict, name, tensor, data pointer, version) of every tensor of the layers, as fused."""
        return [
            (store, name, t, t.data_ptr(), None if t.is_inference() else t._version)
            for layer in layers
            for store in (layer._parameters, layer._buffers)
            for name, t in store.items()
            if t is not None
        ]

    def current(self, block: Block) -> bool:
        """Checked before every decoded token, so kept to dictionary lookups and pointer compares
        (about 1 us per layer): the same layer objects, holding the same tensor objects, over the
        same memory, not updated in place since."""
        attn, mlp = block._modules["self_attn"]._modules, block._modules["mlp"]._modules
        q, k, v, gate, up = self.layers
        return (
            attn["q_proj"] is q
            and attn["k_proj"] is k
            and attn["v_proj"] is v
            and mlp["gate_proj"] is gate
            and mlp["up_proj"] is up
            and all(
                store.get(name) is t and t.data_ptr() == ptr and (version is None or t._version == version)
                for store, name, t, ptr, version in self.state
            )
        )


def _float_operands(module: nn.Module) -> tuple[list[int], list[torch.Tensor | None]] | None:
    """decode_operands (qwenkit.quant.linear) for fp32 nn.Linear / FusedLinear layers: row-major
    weights, or column-major ones as cpu_decode_layout lays out wide matrices."""
    if type(module) not in (nn.Linear, FusedLinear):
        from qwenkit.quant.linear import decode_operands

        return decode_operands(module)
    from qwenkit.quant.linear import DECODE_F32_COLS, DECODE_F32_ROWS

    w = module.weight.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
        return None
    if w.stride() == (w.shape[1], 1):
        kind = DECODE_F32_ROWS
    elif w.stride(0) == 1 and w.stride(1) >= w.shape[0]:
        kind = DECODE_F32_COLS
    else:
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    return [kind, 0, 0], [w, None, None, bias]


class NativeDecode:
    """Qwen.decode_step on CPU in one call of qwenkit_cpu.decode_layers (quant/cpu_kernels.cpp):
    every block (RMSNorm, fused q/k/v + bias, RoPE, KV-cache write, attention of the new token over
    its row's slots, o_proj + residual, RMSNorm, fused gate/up, SiLU x up, down_proj + residual),
    the final norm and the head, with no Python between them, for fp32 / 16-bit / int8 / int4
    layers. It holds the layers' tensors as the C++ reads them; `current` says whether the model
    still holds the same layers and tensors (else decode_step makes a new one). `usable` is False
    when some layer is of a kind the kernels do not read (decode_step then runs the blocks in Python).
    """

    def __init__(self, model: Qwen, fused: list[FusedProjections]):
        self.fused = list(fused)
        self.watched: list[tuple[dict, str, object]] = []  # (module dict, name, value) to check
        self.pointers: list[tuple[torch.Tensor, int]] = []
        config = model.config
        weights: list[torch.Tensor | None] = []
        ints: list[int] = []
        self.usable = True

        def watch(owner: nn.Module, name: str) -> nn.Module:
            module = owner._modules[name]
            self.watched.append((owner._modules, name, module))
            for store in (module._parameters, module._buffers):
                for tensor_name, tensor in store.items():
                    self.watched.append((store, tensor_name, tensor))
                    if tensor is not None:
                        self.pointers.append((tensor, tensor.data_ptr()))
            return module

        def norm(owner: nn.Module, name: str) -> None:
            w = watch(owner, name).weight
            if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
                self.usable = False
            weights.append(w.detach())

        def linear(module: nn.Module | None) -> None:
            operands = None if module is None else _float_operands(module)
            if operands is None:
                self.usable = False
                operands = [0, 0, 0], [None] * 4
            ints.extend(operands[0])
            weights.extend(operands[1])

        for block, f in zip(model.model.layers, fused, strict=True):
            norm(block, "input_layernorm")
            linear(f.qkv)
            linear(watch(block.self_attn, "o_proj"))
            norm(block, "post_attention_layernorm")
            linear(f.gate_up)
            linear(watch(block.mlp, "down_proj"))
        norm(model.model, "norm")
        linear(watch(model, "lm_head"))
        self.weights, self.ints = weights, ints
        self.eps = config.rms_norm_eps
        self.dims = [config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                     config.head_dim, config.intermediate_size]  # fmt: skip

    def products(self) -> list[tuple[str, list[int], list[torch.Tensor | None]]]:
        """(name, ints, operands) of the step's matrix products in the order it runs them, each as
        qwenkit_cpu.decode_linear takes one (benchmarks/decode_profile.py times them alone)."""
        names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        out = []
        blocks = (len(self.weights) - 5) // 18
        for b in range(blocks):
            for j, (name, at) in enumerate(zip(names, (1, 5, 10, 14), strict=True)):
                t, i = b * 18 + at, b * 12 + 3 * j
                out.append((f"layers.{b}.{name}", self.ints[i : i + 3], self.weights[t : t + 4]))
        out.append(("lm_head", self.ints[-3:], self.weights[-4:]))
        return out

    def current(self, model: Qwen, fused: list[FusedProjections]) -> bool:
        return (
            len(fused) == len(self.fused)
            and all(a is b for a, b in zip(fused, self.fused, strict=True))
            and all(store.get(name) is value for store, name, value in self.watched)
            and all(t.data_ptr() == ptr for t, ptr in self.pointers)
        )  # fmt: skip

    def __call__(self, x: torch.Tensor, cache: KVCache, rope, masks: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, V] for the embedded new tokens x [B, 1, hidden] (cache.slot not advanced)."""
        cos, sin = rope
        return torch.ops.qwenkit_cpu.decode_layers(
            x.reshape(x.shape[0], -1), self.weights, self.ints, cache.keys, cache.values, masks, cache.slot,
            cos, sin, self.eps, self.dims,
        )  # fmt: skip


class Transformer(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen(nn.Module):
    """Qwen causal LM: LongTensor [B, T] -> logits [B, T, vocab]."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)  # named "model" so parameter names match the Qwen2 layout
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config = None  # set by qwenkit.load(); generation falls back to Qwen's defaults
        self.activation_checkpointing = False
        self.fused_decode = True  # decode_step on CPU: q/k/v and gate/up as one product each
        self.native_decode = True  # ... and, where it applies, the whole step in C++ (NativeDecode)
        self._fused: list[FusedProjections | None] = []
        self._native: NativeDecode | None = None

    def _apply(self, fn, recurse=True):
        self._fused = []  # a cast or move makes new tensors: drop the fused copies of the old ones now
        self._native = None
        return super()._apply(fn, recurse)

    # From the embeddings: they stay in floating point when the head is quantized or 16-bit (qwenkit.quant).
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, seed: int | None = None) -> None:
        """Initialization as the original: normal(0, 0.02), output projections 0.02/sqrt(2*layers)."""
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(param)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            else:
                is_output = name.endswith(("o_proj.weight", "down_proj.weight"))
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, out_std if is_output else std, generator=generator)
                with torch.no_grad():
                    param.copy_(values)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids [B, T] (arguments: `hidden_states`)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, last_only, segment_ids))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final (normalized) hidden states [B, T, hidden] the LM head reads; a reward model's
        score head reads them too (qwenkit.train.reward).

        attention_mask [B, T] (1 = token, 0 = left padding) is only needed for padded batches.
        With a cache, the tokens are appended after what it holds; pass `attention_mask` only with
        the first (prefill) call. `last_only` computes logits for the last position alone.
        segment_ids [B, T] packs several sequences per row (training): positions restart at each
        new id and attention never crosses from one sequence to another.
        """
        config = self.config
        b, t = input_ids.shape
        if cache is not None and cache.length + t > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} tokens; {cache.length + t} needed")
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids cannot be combined with a cache or an attention_mask")
            positions = key_positions = positions_in_segments(segment_ids)
            padded = False
        else:
            positions, key_positions, padded = self._positions(input_ids, attention_mask, cache)
        x = self.model.embed_tokens(input_ids)
        long_context = not self.training  # NTK, LogN and windows are inference-only
        training_length = config.max_position_embeddings

        if cache is not None and cache.inv_freq is not None:
            inv_freq = cache.inv_freq  # NTK factor fixed at prefill, as the original does
        else:
            alphas = [1.0] * b
            if long_context and config.use_dynamic_ntk:
                lengths = (key_positions.max(dim=1).values + 1).tolist()  # real length of each row
                alphas = [ntk_alpha(n, training_length) for n in lengths]
            inv_freq = rotary_inv_freq(config.head_dim, config.rope_theta, alphas, x.device)
            if cache is not None:
                cache.inv_freq = inv_freq
        rope = rotary_cos_sin(positions.clamp(min=0), inv_freq)

        uses_position = long_context and (config.use_logn_attn or config.use_window_attn)
        last_position = int(positions.max()) if uses_position else 0
        query_scale = None
        if config.use_logn_attn and last_position >= training_length:
            query_scale = logn_scale(positions, training_length).float()

        windows = config.layer_window_sizes() if long_context and config.use_window_attn else None
        chunk_after_prefix = cache is not None and cache.length > 0 and t > 1
        masks: dict[int | None, torch.Tensor | None] = {}

        def mask_for(window: int | None) -> torch.Tensor | None:
            if window is not None and last_position < window:
                window = None  # every key a query can see lies inside this layer's window
            if window not in masks:
                needed = padded or window is not None or chunk_after_prefix or segment_ids is not None
                mask = attention_mask_from_positions(positions, key_positions, window) if needed else None
                if segment_ids is not None:  # block-diagonal: each packed sequence sees only itself
                    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
                masks[window] = mask
            return masks[window]

        # Without a mask, prefill uses SDPA's causal mode (flash kernels on CUDA); one new token sees all keys.
        is_causal = t > 1 and not chunk_after_prefix
        for i, layer in enumerate(self.model.layers):
            mask = mask_for(windows[i] if windows is not None else None)
            args = (x, rope, mask, is_causal and mask is None, query_scale, cache)
            if self.activation_checkpointing and self.training:  # recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if cache is not None:
            cache.length += t
        if last_only:
            x = x[:, -1:]
        return self.model.norm(x)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, width: int | None = None) -> torch.Tensor:
        """Logits [B, V] for one new token per row, written at each row's `cache.slot` and seen at
        `cache.next_position`. With `width` None every cache slot is attended under a mask, so shapes
        and control flow never depend on the data and a CUDA graph can capture it; a `width` attends
        only the first `width` slots (eager batched decoding of rows with different lengths).
        The rows come from `cache.insert` after a prefill."""
        config = self.config
        positions = cache.next_position
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        cache.positions[rows, cache.slot] = positions[:, 0]
        key_positions = cache.positions if width is None else cache.positions[:, :width]
        rope = rotary_cos_sin(positions, cache.inv_freq)
        query_scale = (
            logn_scale(positions, config.max_position_embeddings).float() if config.use_logn_attn else None
        )
        windows = config.layer_window_sizes() if config.use_window_attn else [None] * config.num_hidden_layers
        masks = {
            w: attention_mask_from_positions(positions, key_positions, w, own_slot=False)
            for w in set(windows)
        }
        x = self.model.embed_tokens(tokens)
        if self.fused_decode and tokens.device.type == "cpu" and not torch.is_grad_enabled():
            fused = self._fused_projections()
            native = self._native_decode(fused, tokens, cache) if self.native_decode else None
            if native is not None:  # every block, the norm and the head in one C++ call
                logits = native(x, cache, rope, [masks[w] for w in windows])
                cache.slot += 1
                cache.next_position += 1
                return logits
            for layer, window, f in zip(self.model.layers, windows, fused, strict=True):
                x = layer.decode(x, rope, masks[window], query_scale, cache, f)
        else:
            for layer, window in zip(self.model.layers, windows, strict=True):
                x = layer(x, rope, masks[window], False, query_scale, cache)
        cache.slot += 1
        cache.next_position += 1
        return self.lm_head(self.model.norm(x))[:, -1]

    def _fused_projections(self) -> list[FusedProjections]:
        """Each block's FusedProjections, fused again where a block changed since (FusedProjections.current)."""
        fused = getattr(self, "_fused", [])
        layers = self.model.layers
        if len(fused) != len(layers):
            fused = [None] * len(layers)
        self._fused = [f if f is not None and f.current(layer) else FusedProjections(layer)
                       for f, layer in zip(fused, layers, strict=True)]  # fmt: skip
        return self._fused

    def _native_decode(self, fused: list[FusedProjections], tokens: torch.Tensor, cache: KVCache):
        """The NativeDecode step for this model as it is now, or None where it does not apply (then
        decode_step runs the blocks in Python): fp32 model and cache, no int8 KV cache, no LogN
        scaling, at most GEMV_MAX_ROWS rows, every layer of a kind the kernels read."""
        from qwenkit.quant.linear import GEMV_MAX_ROWS, native_kernels

        config = self.config
        if (
            cache.quantized
            or config.use_logn_attn
            or cache.dtype != torch.float32
            or self.dtype != torch.float32
            or tokens.shape[0] > GEMV_MAX_ROWS
            or tokens.shape[1] != 1
            or not native_kernels()
        ):
            return None
        plan = self._native
        if plan is None or not plan.current(self, fused):
            plan = self._native = NativeDecode(self, fused)
        return plan if plan.usable else None

    def _positions(self, input_ids, attention_mask, cache):
        """Real positions of the new tokens [B, T] and of every visible key [B, S]; -1 marks padding."""
        b, t = input_ids.shape
        device = input_ids.device
        if cache is not None and cache.length > 0:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with the first call on a cache")
            positions = cache.next_positions() + torch.arange(t, device=device)
            padded = cache.padded
        elif attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.long)
            positions = attention_mask.cumsum(dim=1) - 1
            positions = positions.masked_fill(attention_mask == 0, -1)
            padded = bool((attention_mask == 0).any())
        else:
            positions = torch.arange(t, device=device).expand(b, t)
            padded = False
        if cache is None:
            return positions, positions, padded
        cache.positions[:, cache.length : cache.length + t] = positions
        cache.padded = padded
        return positions, cache.positions[:, : cache.length + t], padded

    # Generation and chat live in their own modules; these methods give the official call forms.
    def generate(self, input_ids: torch.Tensor, **settings) -> torch.Tensor:
        from qwenkit.generation import generate

        return generate(self, input_ids, **settings)

    def stream_generate(self, tokenizer, input_ids: torch.Tensor, **settings) -> Iterator[str]:
        from qwenkit.generation import stream_generate

        return stream_generate(self, tokenizer, input_ids, **settings)

    def chat(self, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **settings):
        from qwenkit.chat import chat

        return chat(self, tokenizer, query, history=history, system=system, **settings)

    def chat_stream(
        self, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **settings
    ) -> Iterator[str]:
        from qwenkit.chat import chat_stream

        return chat_stream(self, tokenizer, query, history=history, system=system, **settings)


def positions_in_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token within its run of equal segment ids [B, T] (restarting at 0)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


HUGE_PAGE_BYTES = 2 << 20  # x86-64 transparent huge pages
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError):
        return None


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor whose whole 2 MiB pages are advised to Linux as
    transparent huge pages (madvise MADV_HUGEPAGE, before anything touches them), when the system
    allows it (THP "madvise" or "always"); elsewhere a plain torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < 2 * HUGE_PAGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE_BYTES
    madvise(
        raw.data_ptr() + offset, nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, MADV_HUGEPAGE
    )  # best effort
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def cpu_decode_layout(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU weight matrix laid out for decoding: column-major when it widens (out >= 2 x in:
    gate/up and the head), in memory backed by huge pages (huge_page_empty). Values and shape stay.

    On CPU, decoding is one matrix-vector product per weight, streamed from memory. MKL reads a wide
    matrix about 1.5-1.8x faster in column-major order (docs/benchmarks.md); 2 MiB pages spare the
    stream most of its TLB misses (docs/quantization.md: the head's product 8-24% faster).
    """
    out_features, in_features = weight.shape
    if out_features >= 2 * in_features:
        copy = huge_page_empty((in_features, out_features), weight.dtype)
        return copy.copy_(weight.t()).t()
    return huge_page_empty(tuple(weight.shape), weight.dtype).copy_(weight)


def attention_mask_from_positions(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None, own_slot: bool = True
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: a query sees real keys at or before its position (within `window`).

    Queries are the last T of the S key slots. Each query also sees its own slot, so padding rows
    never have an empty softmax (which would turn into NaN and leak through the values).
    """
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    if not own_slot:  # every query is a real token (decoding): no padding row can be empty
        return visible
    t, s = query_positions.shape[1], key_positions.shape[1]
    own = torch.arange(s, device=k.device)[None, :] == torch.arange(s - t, s, device=k.device)[:, None]
    return visible | own
