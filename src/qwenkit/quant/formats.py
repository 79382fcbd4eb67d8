"""The published packings of quantized checkpoints <-> QuantizedWeight.

GPTQ (the auto-gptq format, Qwen-7B-Chat-Int4 and Qwen2.5-*-GPTQ-Int4/Int8), per linear layer:
  qweight int32 [in / (32/bits), out]: input rows 0..P-1 of each block of P = 32/bits rows share an
          int32, row P*j + k in bits k*bits .. (k+1)*bits - 1 of qweight[j, o]
  qzeros  int32 [groups, out / P]: the zero points packed the same way along outputs, stored as
          zero - 1 (checkpoint_format "gptq"; "gptq_v2" stores the zero itself)
  scales  fp16 [groups, out]; g_idx int32 [in]: the group of each input row (not monotonic with act-order)
AWQ (AutoAWQ's GEMM version, Qwen2.5-*-AWQ), 4 bits only:
  qweight int32 [in, out / 8] and qzeros int32 [groups, out / 8] both packed along outputs; the 8
          fields of an int32 hold columns 8c + AWQ_ORDER[k] at bits 4k; zeros stored as they are
  scales  fp16 [groups, out]; no g_idx (groups are contiguous)
Both dequantize to W[o, i] = scale * (q - zero) with the group of input i.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenkit.errors import QwenkitError
from qwenkit.quant.weights import QuantizedWeight

GPTQ, AWQ = "gptq", "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field k of an AWQ int32 holds output column 8c + AWQ_ORDER[k]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset subtracted from stored zeros
PARTS = {GPTQ: ("qweight", "qzeros", "scales", "g_idx"), AWQ: ("qweight", "qzeros", "scales")}


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's quantization settings (config.json's quantization_config / quantize_config.json)."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group per row (per-channel)
    desc_act: bool = False  # act-order: GPTQ quantized the columns by decreasing activation (g_idx permuted)
    sym: bool = True
    zero_offset: int = 1  # GPTQ stores zero - 1 ("gptq"), or the zero ("gptq_v2"); AWQ: 0

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        """What `qwenkit info` shows."""
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "act_order": self.desc_act,
            "sym": self.sym,
        }


def read_quant_config(directory: str | Path, hf: dict) -> QuantConfig | None:
    """The checkpoint's quantization, or None for a float checkpoint; unsupported variants raise
    a QwenkitError naming the field and its value."""
    from_config = hf.get("quantization_config")
    file = Path(directory) / "quantize_config.json"
    from_file = None
    if file.is_file():
        try:
            from_file = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QwenkitError(f"{file} is not valid JSON: {e}") from None
    if from_config is None and from_file is None:
        return None
    for source, settings in (("config.json quantization_config", from_config), (str(file), from_file)):
        if settings is not None and not isinstance(settings, dict):
            raise QwenkitError(f"{source} must be a JSON object, got {type(settings).__name__}")
    settings = dict(from_file or {})
    source = "config.json quantization_config" if from_config is not None else file.name
    for key, value in (from_config or {}).items():
        if key in ("bits", "group_size", "desc_act", "sym") and key in settings and settings[key] != value:
            raise QwenkitError(
                f"quantization setting {key!r} disagrees: {value!r} in config.json, {settings[key]!r} in {file.name}"
            )
        settings[key] = value
    return parse_quant_config(settings, source)


def parse_quant_config(settings: dict, source: str = "quantization_config") -> QuantConfig:
    """QuantConfig from the settings dict, checked against what qwenkit reads."""
    method = str(settings.get("quant_method", GPTQ)).lower()
    if method not in (GPTQ, AWQ):
        raise QwenkitError(f"{source}: quant_method {method!r} is not supported; qwenkit reads gptq and awq")
    bits = settings.get("bits", settings.get("w_bit"))
    allowed_bits = (4, 8) if method == GPTQ else (4,)
    if bits not in allowed_bits:
        raise QwenkitError(
            f"{source}: bits {bits!r} is not supported for {method}; use {' or '.join(map(str, allowed_bits))}"
        )
    group_size = settings.get("group_size", settings.get("q_group_size", -1))
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or not (group_size == -1 or group_size > 0)
    ):
        raise QwenkitError(f"{source}: group_size {group_size!r} must be a positive int or -1 (per-channel)")
    desc_act, sym = settings.get("desc_act", False), settings.get("sym", True)
    for key, value in (("desc_act", desc_act), ("sym", sym)):
        if not isinstance(value, bool):
            raise QwenkitError(f"{source}: {key} {value!r} must be true or false")
    if method == GPTQ:
        if settings.get("is_marlin_format"):
            raise QwenkitError(
                f"{source}: is_marlin_format true is not supported; qwenkit reads the gptq packing"
            )
        checkpoint_format = settings.get("checkpoint_format", "gptq")
        if checkpoint_format not in GPTQ_FORMATS:
            raise QwenkitError(
                f"{source}: checkpoint_format {checkpoint_format!r} is not supported; "
                f"qwenkit reads {' and '.join(GPTQ_FORMATS)}"
            )
        return QuantConfig(GPTQ, bits, group_size, desc_act, sym, GPTQ_FORMATS[checkpoint_format])
    version = str(settings.get("version", "gemm")).lower()
    if version != "gemm":
        raise QwenkitError(
            f"{source}: version {version!r} is not supported; qwenkit reads AWQ's gemm packing"
        )
    zero_point = settings.get("zero_point", True)
    if zero_point is not True:
        raise QwenkitError(
            f"{source}: zero_point {zero_point!r} is not supported; qwenkit reads zero_point true"
        )
    return QuantConfig(AWQ, bits, group_size, desc_act=False, sym=False, zero_offset=0)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n, m] -> levels [n * P, m]: field k of packed[j] is row P*j + k."""
    fields = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    levels = (packed.unsqueeze(1) >> shifts.view(1, fields, 1)) & ((1 << bits) - 1)
    return levels.reshape(packed.shape[0] * fields, packed.shape[1])


def _unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n, m] -> levels [n, m * P]: field k of packed[:, c] is column P*c + k."""
    return _unpack_rows(packed.t(), bits).t()


def _pack_rows(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels [n, m] (n a multiple of P) -> int32 [n / P, m], the inverse of _unpack_rows."""
    fields = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=levels.device)
    grouped = levels.to(torch.int64).reshape(levels.shape[0] // fields, fields, levels.shape[1])
    words = (grouped << shifts.view(1, fields, 1)).sum(dim=1)  # the fields do not overlap: sum == or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_columns(levels: torch.Tensor, bits: int) -> torch.Tensor:
    return _pack_rows(levels.t(), bits).t().contiguous()


def _check(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        raise QwenkitError(
            f"{name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}; "
            f"expected {' or '.join(str(d).removeprefix('torch.') for d in dtypes)} {list(shape)}"
        )


def _integer_levels(name: str, values: torch.Tensor, bits: int) -> torch.Tensor:
    rounded = values.round()
    if not torch.equal(rounded, values) or values.min() < 0 or values.max() >= 1 << bits:
        raise QwenkitError(f"{name} must be integers in 0 .. {(1 << bits) - 1} to be packed")
    return rounded.to(torch.int64)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int = 1,
    name: str = "layer",
) -> QuantizedWeight:
    """One auto-gptq layer -> QuantizedWeight; group_size -1 means per-channel. A g_idx that is just
    i // group_size (no act-order) is dropped so kernels see contiguous groups."""
    fields = 32 // bits
    in_features, out_features = qweight.shape[0] * fields, qweight.shape[1]
    group_size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / group_size)
    _check(f"{name}.qweight", qweight, (torch.int32,), (in_features // fields, out_features))
    if out_features % fields:
        raise QwenkitError(
            f"{name}.qweight has {out_features} outputs, not a multiple of {fields} (packed qzeros)"
        )
    _check(f"{name}.qzeros", qzeros, (torch.int32,), (n_groups, out_features // fields))
    _check(f"{name}.scales", scales, (torch.float16, torch.bfloat16, torch.float32), (n_groups, out_features))
    if g_idx is not None:
        _check(f"{name}.g_idx", g_idx, (torch.int32, torch.int64), (in_features,))
        if torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
            g_idx = None
        elif int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise QwenkitError(f"{name}.g_idx has groups outside 0 .. {n_groups - 1}")
    q = _unpack_rows(qweight, bits).t().to(torch.uint8).contiguous()
    zeros = (_unpack_columns(qzeros, bits) + zero_offset) & ((1 << bits) - 1)  # stored zero - 1 wraps at 0
    return QuantizedWeight(
        q=q,
        scales=scales.t().contiguous(),
        zeros=zeros.t().to(scales.dtype).contiguous(),
        bits=bits,
        group_size=group_size,
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )


def pack_gptq(weight: QuantizedWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {qweight, qzeros, scales (fp16), g_idx} in the auto-gptq packing."""
    bits, fields = weight.bits, 32 // weight.bits
    if weight.in_features % fields or weight.out_features % fields:
        raise QwenkitError(
            f"gptq packing needs in and out features divisible by {fields}, got "
            f"{weight.out_features} x {weight.in_features}"
        )
    zeros = _integer_levels("zeros", weight.zeros.float(), bits)
    stored = (zeros - zero_offset) & ((1 << bits) - 1)
    return {
        "qweight": _pack_rows(weight.q.t(), bits),
        "qzeros": _pack_columns(stored.t(), bits),
        "scales": weight.scales.t().to(torch.float16).contiguous(),
        "g_idx": weight.group_index().to(torch.int32),
    }


def unpack_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    name: str = "layer",
) -> QuantizedWeight:
    """One AutoAWQ GEMM layer -> QuantizedWeight (group_size -1: per-channel)."""
    if bits != 4:
        raise QwenkitError(f"{name}: AWQ gemm packing has 4 bits, got bits {bits}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    group_size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / group_size)
    _check(f"{name}.qweight", qweight, (torch.int32,), (in_features, out_features // 8))
    _check(f"{name}.qzeros", qzeros, (torch.int32,), (n_groups, out_features // 8))
    _check(f"{name}.scales", scales, (torch.float16, torch.bfloat16, torch.float32), (n_groups, out_features))
    inverse = [AWQ_ORDER.index(k) for k in range(8)]  # column 8c + k sits in field inverse[k]

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        fields = _unpack_columns(packed, bits).reshape(packed.shape[0], -1, 8)
        return fields[:, :, inverse].reshape(packed.shape[0], -1)

    return QuantizedWeight(
        q=unpack(qweight).t().to(torch.uint8).contiguous(),
        scales=scales.t().contiguous(),
        zeros=unpack(qzeros).t().to(scales.dtype).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def pack_awq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {qweight, qzeros, scales (fp16)} in AutoAWQ's GEMM packing."""
    if weight.bits != 4 or weight.g_idx is not None or weight.out_features % 8:
        raise QwenkitError(
            "AWQ gemm packing needs bits 4, contiguous groups (no g_idx) and outputs divisible by 8, got "
            f"bits {weight.bits}, g_idx {'set' if weight.g_idx is not None else 'none'}, {weight.out_features} outputs"
        )
    order = list(AWQ_ORDER)

    def pack(levels: torch.Tensor) -> torch.Tensor:  # levels [n, out]
        fields = levels.reshape(levels.shape[0], -1, 8)[:, :, order].reshape(levels.shape[0], -1)
        return _pack_columns(fields, 4)

    zeros = _integer_levels("zeros", weight.zeros.float(), 4)
    return {
        "qweight": pack(weight.q.t()),
        "qzeros": pack(zeros.t()),
        "scales": weight.scales.t().to(torch.float16).contiguous(),
    }


def unpack_layer(config: QuantConfig, parts: dict[str, torch.Tensor], name: str = "layer") -> QuantizedWeight:
    """A layer's stored tensors ({qweight, qzeros, scales[, g_idx]}) -> QuantizedWeight."""
    missing = [p for p in PARTS[config.method] if p not in parts and p != "g_idx"]
    if missing:
        raise QwenkitError(f"{name} lacks {', '.join(f'{name}.{p}' for p in missing)}")
    if config.method == GPTQ:
        return unpack_gptq(
            parts["qweight"],
            parts["qzeros"],
            parts["scales"],
            parts.get("g_idx"),
            config.bits,
            config.group_size,
            config.zero_offset,
            name,
        )
    return unpack_awq(
        parts["qweight"], parts["qzeros"], parts["scales"], config.bits, config.group_size, name
    )


def pack_layer(config: QuantConfig, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> the layer's stored tensors in the checkpoint's format."""
    if weight.bits != config.bits:
        raise QwenkitError(
            f"weight has bits {weight.bits}, the checkpoint's quantization_config says {config.bits}"
        )
    return pack_gptq(weight, config.zero_offset) if config.method == GPTQ else pack_awq(weight)
