"""Weight-only quantization of a model: round-to-nearest (RTN) and GPTQ (Frantar et al. 2022).

Both give one QuantizedWeight per linear layer of the blocks (q/k/v/o, gate/up/down; the head too on
request), with auto-gptq's grid: per group of input columns, scale = (max - min) / (2**bits - 1) over
a range that always includes 0, level = clamp(round(w / scale) + zero, 0, 2**bits - 1).

- symmetric (default, as Qwen's published GPTQ-Int4/Int8 checkpoints: sym true): range
  [-max|w|, max|w|], zero = 2**(bits-1) (8 for int4, 128 for int8).
- asymmetric: range [min(w, 0), max(w, 0)], zero = round(-min / scale), kept >= 1: the GPTQ format
  stores zero - 1 in `bits` unsigned bits, which other readers do not wrap back (a zero of 0 would be
  read as 2**bits), so a row whose minimum rounds to level 0 gets scale = max / (2**bits - 2).

GPTQ quantizes the columns in order and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (H = X^T X over calibration tokens):
paper §3 "Step 3: Cholesky reformulation" and Algorithm 1, with the lazy block updates of §3 "Step 2".
Conventions as auto-gptq's gptq.py (static_groups off): damping adds `damp` x mean(diag H) to the
diagonal, dead inputs (diag H = 0) get weight 0, a group's scale and zero are fixed when its first
column comes up, act-order quantizes columns by decreasing diag H and g_idx maps each input column to
its group in that order. `quantize_model` runs it block by block as auto-gptq does.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quant.weights import SUPPORTED_BITS, QuantizedWeight

METHODS = {  # name -> (bits, uses GPTQ)
    "int8": (8, False),
    "int4": (4, False),
    "gptq-int8": (8, True),
    "gptq-int4": (4, True),
}
PER_CHANNEL = -1  # group_size meaning one group per output row (as quantize_config.json writes it)
# Sub-layers of a block in the order GPTQ quantizes them ("true_sequential"): each group's inputs are
# recorded with the groups before it already quantized.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def default_group_size(method: str) -> int:
    """int8 (RTN): per channel; int4 and both GPTQ methods: groups of 128 (Qwen2.5-GPTQ-Int4/Int8)."""
    return PER_CHANNEL if method == "int8" else 128


# ---- the quantization grid ------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise QwenkitError(f"bits must be 4 or 8, got {bits!r}")
    return (1 << bits) - 1


def _resolve_group_size(group_size: int | None, in_features: int) -> int:
    if group_size is None or group_size == PER_CHANNEL:
        return in_features
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise QwenkitError(f"group_size must be a positive int or -1 (per channel), got {group_size!r}")
    return group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [rows], zero [rows]) of the grid for the columns `w` [rows, cols] (module docstring)."""
    maxq = _check_bits(bits)
    w = w.float()
    low = w.min(dim=1).values.clamp(max=0)
    high = w.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    flat = (low == 0) & (high == 0)  # an all-zero row: any grid represents it; avoid scale 0
    low = torch.where(flat, -1.0, low)
    high = torch.where(flat, 1.0, high)
    scale = (high - low) / maxq
    if sym:
        return _fp16_at_least(scale), torch.full_like(scale, (maxq + 1) / 2)
    stuck = torch.round(-low / scale) < 1  # see the module docstring: zero 0 cannot be stored
    scale = _fp16_at_least(torch.where(stuck, high / (maxq - 1), scale))
    return scale, torch.where(stuck, 1.0, torch.round(-low / scale).clamp(min=1))


def _fp16_at_least(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= scale (as fp32): the checkpoint stores fp16 scales, so the levels are
    chosen for the stored scale, and rounding up keeps the group's range on the grid."""
    half = scale.clamp(min=torch.finfo(torch.float16).tiny).half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    return half.float()


def quantize_levels(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels (as float) of w [rows, cols] on the grid (scale, zero) [rows]."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


def rtn(weight: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest: each group of `group_size` input columns on its own grid (-1/None: per row)."""
    if weight.dim() != 2:
        raise QwenkitError(f"weight must be a 2-d [out, in] tensor, got shape {list(weight.shape)}")
    _check_bits(bits)
    w = weight.detach().float()
    out_features, in_features = w.shape
    group_size = _resolve_group_size(group_size, in_features)
    n_groups = math.ceil(in_features / group_size)
    q = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, n_groups, device=w.device)
    zeros = torch.empty_like(scales)
    for g in range(n_groups):
        cols = slice(g * group_size, (g + 1) * group_size)
        scales[:, g], zeros[:, g] = grid_params(w[:, cols], bits, sym)
        q[:, cols] = quantize_levels(w[:, cols], scales[:, g], zeros[:, g], bits).to(torch.uint8)
    return QuantizedWeight(q, scales, zeros, bits, group_size)


# ---- GPTQ -----------------------------------------------------------------------------------------


def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    act_order: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    block: int = 128,
) -> QuantizedWeight:
    """GPTQ of one linear weight [out, in] given the Hessian H = X^T X [in, in] of its inputs.

    Minimizes ||X W^T - X Q^T||^2 column by column (module docstring). `damp`: fraction of the mean
    of diag(H) added to the diagonal (auto-gptq's damp_percent); `block`: columns per lazy update.
    """
    if weight.dim() != 2:
        raise QwenkitError(f"weight must be a 2-d [out, in] tensor, got shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    if H.shape != (in_features, in_features):
        raise QwenkitError(f"H must be [{in_features}, {in_features}] for this weight, got {list(H.shape)}")
    maxq = _check_bits(bits)
    group_size = _resolve_group_size(group_size, in_features)
    if not 0 < damp < 1:
        raise QwenkitError(f"damp must lie in (0, 1), got {damp!r}")
    if not isinstance(block, int) or block < 1:
        raise QwenkitError(f"block must be a positive int, got {block!r}")
    W = weight.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    dead = H.diagonal() == 0  # inputs that were always 0: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    # Upper Cholesky factor of H^-1: row c holds the weights of column c's error on the later columns.
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise QwenkitError("the damped Hessian is not positive definite; raise damp") from None

    n_groups = math.ceil(in_features / group_size)
    Q = torch.empty(out_features, in_features, dtype=torch.uint8, device=W.device)
    scales = torch.empty(out_features, n_groups, device=W.device)
    zeros = torch.empty_like(scales)
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        errors = torch.empty(out_features, b1 - b0, device=W.device)
        for c in range(b0, b1):
            g = c // group_size
            if c % group_size == 0:  # the group's grid, from its columns as updated so far
                scales[:, g], zeros[:, g] = grid_params(W[:, c : c + group_size], bits, sym)
            w = W[:, c]
            q = torch.clamp(torch.round(w / scales[:, g]) + zeros[:, g], 0, maxq)
            Q[:, c] = q.to(torch.uint8)
            err = (w - scales[:, g] * (q - zeros[:, g])) / U[c, c]
            W[:, c + 1 : b1] -= err[:, None] * U[c, c + 1 : b1][None, :]
            errors[:, c - b0] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]  # the block's errors on the columns after it, at once

    g_idx = None
    if perm is not None:  # back to the original column order; column perm[p] was quantized p-th
        Q = Q[:, torch.argsort(perm)]
        g_idx = torch.empty(in_features, dtype=torch.int32, device=W.device)
        g_idx[perm] = (torch.arange(in_features, device=W.device) // group_size).to(torch.int32)
    return QuantizedWeight(Q, scales, zeros, bits, group_size, g_idx)


def layer_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """||X W^T - X Q^T||_F^2 from H = X^T X: trace((W - Q) H (W - Q)^T)."""
    delta = (weight.float() - quantized.float()).to(H.dtype)
    return float(((delta @ H) * delta).sum())


# ---- a whole model --------------------------------------------------------------------------------


@dataclass
class Quantization:
    """What `quantize_model` did: its settings and the quantized weight of each replaced linear layer
    (by module name, e.g. "model.layers.0.self_attn.q_proj"), with that layer's float bias."""

    method: str
    bits: int
    group_size: int  # as written to quantize_config.json: -1 = per channel
    sym: bool
    act_order: bool
    damp: float
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def quantize_head(self) -> bool:
        return "lm_head" in self.weights


def check_method(method: str, group_size: int | None, act_order: bool) -> tuple[int, bool, int]:
    """(bits, uses GPTQ, group_size) for the user's choices; bad combinations raise QwenkitError."""
    if method not in METHODS:
        raise QwenkitError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    bits, uses_gptq = METHODS[method]
    group_size = default_group_size(method) if group_size is None else group_size
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or not (group_size == -1 or group_size > 0)
    ):
        raise QwenkitError(f"group_size must be a positive int or -1 (per channel), got {group_size!r}")
    if act_order and not uses_gptq:
        raise QwenkitError(f"act_order needs a GPTQ method (gptq-int4, gptq-int8), not {method!r}")
    return bits, uses_gptq, group_size


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int | None = None,
    calibration: Sequence[torch.Tensor] | str | Path | None = None,
    samples: int = 128,
    seq_len: int = 512,
    quantize_head: bool = False,
    progress: bool = True,
    act_order: bool = False,
    sym: bool = True,
    damp: float = 0.01,
    tokenizer=None,
    replace: bool = True,
) -> Quantization:
    """Quantize the linear layers of `model`'s blocks (and its head with `quantize_head`) in place.

    method: int8 | int4 (RTN) | gptq-int8 | gptq-int4. group_size: None = the method's default
    (default_group_size), -1 = per channel. GPTQ calibrates on `calibration`: token id tensors (e.g.
    from calibration_batches), a file (read by calibration_batches with `tokenizer`, `samples`,
    `seq_len`) or None, the built-in mix (needs `tokenizer`; a warning says real data is better). Block by block with bounded memory, as auto-gptq: the calibration inputs of
    block i go through it once per sub-layer group (SEQUENTIAL_GROUPS) to collect H = X^T X of the
    next group's inputs, the group is quantized (its weights replaced by the dequantized ones), and
    the outputs of the quantized block are block i+1's inputs. With `replace`, the layers then become
    QuantLinear (packed); otherwise they keep the dequantized float weights.
    """
    bits, uses_gptq, group_size = check_method(method, group_size, act_order)
    layers = list(model.model.layers)
    result = Quantization(method, bits, group_size, sym, act_order, damp)
    names = [
        f"model.layers.{i}.{sub}" for i in range(len(layers)) for group in SEQUENTIAL_GROUPS for sub in group
    ]
    if quantize_head:
        names.append("lm_head")
    for name in names:
        if type(model.get_submodule(name)) is not nn.Linear:
            raise QwenkitError(
                f"{name} is not a float nn.Linear (already quantized?); quantize a float model"
            )
    bar = _progress(len(names), f"quantizing ({method})", progress)

    def quantize(named: dict[str, nn.Linear], H: torch.Tensor | None) -> None:
        """Quantize layers that share their input (and so H): as one stacked matrix, since GPTQ treats
        each output row on its own given H (paper §3), then cut back into the layers."""
        linears = list(named.values())
        if H is None:
            weights = [rtn(linear.weight, bits, group_size, sym) for linear in linears]
        else:
            stacked = torch.cat([linear.weight.detach() for linear in linears])
            whole = gptq(stacked, H, bits, group_size, act_order, sym, damp)
            weights = whole.split_outputs([linear.out_features for linear in linears])
        for (name, linear), w in zip(named.items(), weights, strict=True):
            result.weights[name] = w
            if linear.bias is not None:
                result.biases[name] = linear.bias.detach().clone()
            if name == "lm_head" and model.config.tie_word_embeddings:  # stored apart from the embeddings now
                device = linear.weight.device
                model.lm_head = linear = nn.Linear(
                    linear.in_features, linear.out_features, bias=False, device=device
                )
                model.config.tie_word_embeddings = False
            linear.weight = nn.Parameter(
                w.dequantize(model.model.embed_tokens.weight.dtype), requires_grad=False
            )
            bar.update(1)
            bar.set_postfix_str(name)

    try:
        with torch.no_grad():
            if not uses_gptq:
                for name in names:
                    quantize({name: model.get_submodule(name)}, None)
            else:
                if calibration is None or isinstance(calibration, (str, Path)):
                    if tokenizer is None:
                        raise QwenkitError(
                            "GPTQ needs calibration token ids, or a tokenizer to read its data"
                        )
                    calibration = calibration_batches(tokenizer, calibration, samples, seq_len)
                if not calibration:
                    raise QwenkitError("GPTQ needs at least one calibration sample")
                _gptq_blocks(model, layers, calibration, quantize_head, quantize)
    finally:
        bar.close()
    if replace:
        replace_linears(model, result)
    return result


def _gptq_blocks(model, layers, calibration, quantize_head: bool, quantize: Callable) -> None:
    """GPTQ block by block (quantize_model's docstring)."""
    inputs, block_args = _block_inputs(model, calibration)
    for i, layer in enumerate(layers):
        for group in SEQUENTIAL_GROUPS:
            named = {f"model.layers.{i}.{sub}": layer.get_submodule(sub) for sub in group}
            hessians = _collect_hessians(named.values(), layer, inputs, block_args)
            first = hessians[next(iter(named.values()))]
            if all(torch.equal(hessians[linear], first) for linear in named.values()):
                quantize(named, first)
            else:  # inputs differ (a model whose sub-layers do not share them): one at a time
                for name, linear in named.items():
                    quantize({name: linear}, hessians[linear])
        inputs = [layer(x, *a) for x, a in zip(inputs, block_args, strict=True)]  # quantized block's outputs
    if quantize_head:
        head = nn.Sequential(model.model.norm, model.lm_head)
        hessians = _collect_hessians([model.lm_head], head, inputs, [()] * len(inputs))
        quantize({"lm_head": model.lm_head}, hessians[model.lm_head])


class _Captured(Exception):
    """Raised by a hook once it has recorded what it needs, to stop the forward pass there."""


def _block_inputs(model, calibration: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """The first block's hidden-state input and other arguments (rotary tables, mask, ...) per sample.

    The model runs in training mode here (no dynamic NTK, LogN or window attention: calibration
    sequences are within the training length), so every block takes the same arguments.
    """
    inputs: list[torch.Tensor] = []
    args: list[tuple] = []

    def capture(module, positional):
        inputs.append(positional[0])
        args.append(tuple(positional[1:]))
        raise _Captured

    was_training = model.training
    handle = model.model.layers[0].register_forward_pre_hook(capture)
    model.train()
    try:
        for ids in calibration:
            ids = ids.to(model.device).view(1, -1)
            with contextlib.suppress(_Captured):
                model(ids)
    finally:
        handle.remove()
        model.train(was_training)
    return inputs, args


def _collect_hessians(
    linears: Iterable[nn.Linear], run: Callable, inputs: Sequence[torch.Tensor], args: Sequence[tuple]
) -> dict:
    """H = X^T X / tokens of each linear layer's inputs (forward pre-hooks) while `run(x, *args)` runs
    each calibration sample; the run stops as soon as every layer has seen its input (the rest of the
    block is not needed). Layers fed the very same tensor (q/k/v, gate/up) share one product."""
    linears = list(linears)
    totals = {linear: 0.0 for linear in linears}
    tokens = dict.fromkeys(linears, 0)
    products: dict[tuple, tuple] = {}  # this sample's inputs, kept alive so their addresses stay unique
    seen: set[nn.Module] = set()

    def record(module, positional):
        x = positional[0]
        key = (x.data_ptr(), tuple(x.shape))
        if key not in products:
            flat = x.reshape(-1, x.shape[-1]).float()
            products[key] = (x, flat.t() @ flat, flat.shape[0])
        _, xtx, n = products[key]
        totals[module] = totals[module] + xtx
        tokens[module] += n
        seen.add(module)
        if len(seen) == len(linears):
            raise _Captured

    handles = [linear.register_forward_pre_hook(record) for linear in linears]
    try:
        for x, a in zip(inputs, args, strict=True):
            with contextlib.suppress(_Captured):
                run(x, *a)
            products.clear()
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return {linear: totals[linear] / max(tokens[linear], 1) for linear in linears}


def replace_linears(model: nn.Module, quantization: Quantization) -> None:
    """Swap each quantized nn.Linear of `model` for a QuantLinear holding its packed weight."""
    from qwenkit.quant.linear import QuantLinear

    for name, weight in quantization.weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_weight(weight, quantization.biases.get(name)))


def _progress(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not show)


# ---- calibration data -----------------------------------------------------------------------------

BUILTIN_WARNING = (
    "calibrating on qwenkit's built-in synthetic mix (short stories, arithmetic, chats); text like the "
    "model's real inputs (--calibration FILE) gives better GPTQ weights"
)


def calibration_texts(tokenizer, path: str | Path | None) -> Iterable[list[int]]:
    """Token ids of each calibration document: a JSONL/JSON file of ChatML samples (SFT format,
    rendered as SFT renders them), or plain text (.txt, .jsonl with "text", .parquet: data.readers).
    None: the built-in mix (synthetic documents and chats), with a warning."""
    from qwenkit.chatml import render_messages

    if path is None:
        from qwenkit.data.synthetic import chat_samples, generate_documents

        warnings.warn(BUILTIN_WARNING, stacklevel=3)
        for text in generate_documents(2000, seed=1234):
            yield tokenizer.encode(text)
        for sample in chat_samples(2000, seed=1234):
            yield render_messages(tokenizer, sample["messages"]).input_ids
        return
    path = Path(path)
    if not path.is_file():
        raise QwenkitError(f"calibration file {path} not found")
    if _is_chat_file(path):
        from qwenkit.train.sft_data import read_sft_file

        for record in read_sft_file(path):
            if record.error is not None:
                raise QwenkitError(f"{path}: sample {record.index + 1}: {record.error}")
            yield render_messages(tokenizer, record.messages, record.tools).input_ids
        return
    from qwenkit.data.readers import read_documents

    for text in read_documents([path]):
        yield tokenizer.encode(text)


def _is_chat_file(path: Path) -> bool:
    """A JSON list, or JSONL whose first record has "messages" or "conversations" (the SFT formats)."""
    import json

    if path.suffix not in (".json", ".jsonl"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                if line.lstrip().startswith("["):
                    return True
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and ("messages" in record or "conversations" in record)
    return False


def calibration_batches(
    tokenizer, path: str | Path | None, samples: int = 128, seq_len: int = 512
) -> list[torch.Tensor]:
    """`samples` sequences of `seq_len` token ids: the documents joined by <|endoftext|> and cut into
    windows (as GPTQ's paper takes segments of a corpus); fewer when the data runs out."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise QwenkitError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise QwenkitError(f"seq_len must be an int >= 2, got {seq_len!r}")
    needed = samples * seq_len
    ids: list[int] = []
    for document in calibration_texts(tokenizer, path):
        ids.extend(document)
        ids.append(tokenizer.eod_id)
        if len(ids) >= needed:
            break
    if len(ids) < 2:
        raise QwenkitError(f"calibration data {path} holds no text")
    ids = ids[:needed]
    return [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids) - i >= 2]


# ---- writing the GPTQ format ----------------------------------------------------------------------


def gptq_config(quantization: Quantization) -> dict:
    """quantize_config.json as auto-gptq writes it, which is also config.json's quantization_config
    (transformers' GPTQConfig, gptqmodel, vLLM). RTN methods are written the same way: a GPTQ
    checkpoint whose weights were rounded to nearest."""
    config = {
        "bits": quantization.bits,
        "group_size": quantization.group_size,
        "damp_percent": quantization.damp,
        "desc_act": quantization.act_order,
        "static_groups": False,
        "sym": quantization.sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    if quantization.quantize_head:
        config["lm_head"] = True  # gptqmodel's and vLLM's key for a quantized head
    return config


def save_quantized(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    quantization: Quantization,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `model` quantized by `quantize_model` as a GPTQ checkpoint in the Qwen2 layout.

    Quantized layers are stored packed (qweight, qzeros, scales, g_idx; fp16 bias), everything else
    in `dtype` (fp16 as Qwen's published GPTQ checkpoints); config.json carries quantization_config
    and quantize_config.json is written beside it. Written into a temporary directory and renamed.
    """
    import json
    import os
    import shutil
    import tempfile

    from qwenkit.checkpoint import config_to_hf, save_state_dict
    from qwenkit.quant.formats import pack_gptq

    prefixes = tuple(f"{name}." for name in quantization.weights)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefixes):  # a quantized layer's float or kernel tensors
            state[name] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    for name, weight in quantization.weights.items():
        for part, tensor in pack_gptq(weight).items():
            state[f"{name}.{part}"] = tensor.cpu()
        if name in quantization.biases:
            state[f"{name}.bias"] = quantization.biases[name].detach().to(torch.float16)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # dtype None: every tensor is written as it is (int32 packed parts, fp16 floats)
        written = save_state_dict(
            state, model.config, model.generation_config, tokenizer, staging / "out", None
        )
        settings = gptq_config(quantization)
        hf = config_to_hf(model.config, dtype, tokenizer)
        hf["quantization_config"] = settings
        (written / "config.json").write_text(json.dumps(hf, indent=2))
        (written / "quantize_config.json").write_text(json.dumps(settings, indent=2))
        for file in ("config.json", "quantize_config.json"):
            (written / file).chmod((written / "generation_config.json").stat().st_mode)
        if target.exists():
            shutil.rmtree(target)
        os.replace(written, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
