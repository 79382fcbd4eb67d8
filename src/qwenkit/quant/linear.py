"""Linear layers that keep their weights packed: QuantLinear (int8/int4) and HalfLinear (16-bit).

Decoding one token reads every weight once, so its speed is the bytes read per weight: 4 in fp32,
2 in fp16/bf16, 1 in int8, 0.5 in int4. On x86 CPUs with AVX2 the matrix-vector products of decoding
(up to GEMV_MAX_ROWS rows of input) run in qwenkit's own kernels (cpu_kernels.cpp, compiled on first
use with torch.utils.cpp_extension and cached); PyTorch's own weight-only ops are several times slower
on AVX2 (the file says by how much). By default the int8/int4 kernels quantize the input to int8 in
blocks of 32 (as llama.cpp does) and take integer dot products (`QuantLinear.int8_activations`; False
keeps fp32 inputs: exact, slower); 16-bit weights are widened to fp32 in registers. Longer inputs
(prefill) and other devices dequantize the weight in chunks of output rows and multiply with
F.linear: never a whole float copy of the weight.

The quantized form, per group of `group_size` input columns (qwenkit.quant.QuantizedWeight):
W[o, i] = scales[o, g(i)] * (q[o, i] - zeros[o, g(i)]). With act-order (GPTQ desc_act, g_idx not
i // group_size) the input columns are reordered once at load so that each group is a contiguous run,
and every input is gathered in that order: W x = W[:, perm] x[perm].
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quant.weights import QuantizedWeight

GEMV_MAX_ROWS = 4  # inputs with more rows (prefill) use chunked dequantization + F.linear
ACTIVATION_BLOCK = 32  # columns per int8 activation scale in the kernels' default mode
DEQUANT_CHUNK_ELEMENTS = 1 << 22  # float elements dequantized at a time by the fallback (16 MiB fp32) at most
# Output rows widened at a time on CPU (prefill): 512 rows keep the float copy in cache for F.linear.
# Measured on 2 threads, prompt 256, the four Qwen2.5-0.5B matrices: int8 68 ms, int4 65, fp16 61 against
# fp32's 66 per layer; chunks of 16 MiB (the rule kept for other devices, fewer launches) 75 / 69 / 71.
CPU_CHUNK_ROWS = 512


def chunk_rows(in_features: int, device: torch.device) -> int:
    """Weight rows dequantized (or widened) at a time by the chunked paths."""
    rows = DEQUANT_CHUNK_ELEMENTS // in_features
    return max(1, min(CPU_CHUNK_ROWS, rows) if device.type == "cpu" else rows)


INT4_BLOCK = 64  # int4 columns per 32-byte block: column j in the low nibble of byte j, 32 + j in the high


@functools.cache
def native_kernels() -> bool:
    """Whether qwenkit's AVX2 kernels are usable here (built on first call, then cached on disk)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        from qwenkit.extensions import build_extension

        build_extension(
            "qwenkit_cpu_kernels",
            sources=[str(Path(__file__).with_name("cpu_kernels.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, or a build failure: the portable path still works
        warnings.warn(f"qwenkit CPU kernels unavailable ({error}); using dequantize + F.linear", stacklevel=2)
        return False
    return True


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 levels [N, K] (0..15) -> [N, ceil(K / 64) * 32] bytes in the kernels' block layout (K padded with 0)."""
    n, k = q.shape
    padded = math.ceil(k / INT4_BLOCK) * INT4_BLOCK
    q = F.pad(q, (0, padded - k)).view(n, -1, 2, INT4_BLOCK // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, padded // 2).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of pack_int4: uint8 levels [N, in_features]."""
    n = packed.shape[0]
    blocks = packed.view(n, -1, INT4_BLOCK // 2)
    return torch.stack((blocks & 15, blocks >> 4), dim=2).reshape(n, -1)[:, :in_features]


class QuantLinear(nn.Module):
    """y = x W^T + b for a QuantizedWeight W, holding only packed levels, fp32 scales and scales x zeros.

    Buffers: `qweight` uint8 (int8: [out, in]; int4: two levels a byte, pack_int4), `scales` and
    `szeros` (= scales * zeros) fp32 [out, groups], `column_group` int32 [in] (group of each column in
    stored order), `perm` int64 [in] (act-order only: stored column k is input column perm[k]), `bias`.
    Moving the module (`.to`) keeps scales in fp32; outputs come in the input's dtype.

    `int8_activations` (default True): the CPU kernel quantizes each input row to int8 per block of 32
    columns (scale max|x| / 127) and multiplies in integers, as llama.cpp's Q8_0 dot products do;
    the output is W x_hat for that rounded x_hat (relative input error at most 1/254 of each block's
    largest value). False keeps the input in fp32 (exactly W x, about 2-4x slower kernels).
    """

    int8_activations = True

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        szeros: torch.Tensor,
        column_group: torch.Tensor,
        perm: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
    ):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("szeros", szeros)
        self.register_buffer("column_group", column_group)
        self.register_buffer("perm", perm)
        self.register_buffer("bias", bias)
        # The kernels need contiguous groups of whole 32-column runs covering the padded columns.
        groups = torch.arange(in_features, device=column_group.device) // group_size
        stored = qweight.shape[1] * (8 // bits)
        self.kernel_layout = (
            group_size % 32 == 0
            and in_features % group_size == 0
            and stored == in_features
            and bool(torch.equal(column_group.long(), groups))
        )

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack a QuantizedWeight (and an optional bias [out]) for inference."""
        if bias is not None and bias.shape != (weight.out_features,):
            raise QwenkitError(
                f"QuantLinear: bias must have shape [{weight.out_features}], got {list(bias.shape)}"
            )
        q = weight.q
        column_group = weight.group_index()
        perm = None
        if weight.g_idx is not None and not torch.equal(
            column_group, torch.arange(weight.in_features, device=q.device) // weight.group_size
        ):
            perm = torch.argsort(column_group, stable=True)
            q, column_group = q[:, perm], column_group[perm]
        scales = weight.scales.float().contiguous()
        szeros = (scales * weight.zeros.float()).contiguous()
        qweight = pack_int4(q) if weight.bits == 4 else q.contiguous()
        return cls(
            qweight,
            scales,
            szeros,
            column_group.to(torch.int32),
            perm,
            None if bias is None else bias.detach().clone(),
            weight.bits,
            weight.group_size,
            weight.in_features,
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("scales", "szeros"):  # a model cast to bf16 must not round the scales
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, getattr(self, name).float())
        return self

    def levels(self, rows: slice = slice(None)) -> torch.Tensor:
        """The stored integer levels (uint8 [rows, in], in stored column order)."""
        packed = self.qweight[rows]
        return unpack_int4(packed, self.in_features) if self.bits == 4 else packed

    def dequantize_rows(self, rows: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight rows [rows, in] in stored column order (the input gathered by perm matches)."""
        if self.qweight.device.type == "cpu" and self.kernel_layout and native_kernels():
            w = torch.ops.qwenkit_cpu.dequantize(
                self.qweight[rows], self.scales[rows], self.szeros[rows], self.group_size, self.bits
            )
        else:
            g = self.column_group.long()
            w = self.scales[rows][:, g] * self.levels(rows).float() - self.szeros[rows][:, g]
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QwenkitError(f"QuantLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.uses_kernel(x2):
            y = self._kernel_forward(x2)  # bias added in the kernel
        else:
            y = self._dequantized_forward(x2)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def uses_kernel(self, x2: torch.Tensor) -> bool:
        """Whether input rows x2 [M, in] go through the CPU matrix-vector kernel."""
        return (
            x2.device.type == "cpu"
            and x2.shape[0] <= GEMV_MAX_ROWS
            and self.kernel_layout
            and native_kernels()
            and not x2.requires_grad  # the kernels have no backward
        )

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] (stored column order) -> fp32 [M, out], bias included."""
        op = torch.ops.qwenkit_cpu.int4_gemv if self.bits == 4 else torch.ops.qwenkit_cpu.int8_gemv
        bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
        return op(
            x2.float().contiguous(), self.qweight, self.scales, self.szeros, bias, self.group_size,
            self.int8_activations,
        )  # fmt: skip

    def _dequantized_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The portable path: dequantize a chunk of output rows at a time and multiply."""
        out = x2.new_empty((x2.shape[0], self.out_features))
        step = chunk_rows(self.in_features, x2.device)
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            out[:, rows] = F.linear(x2, self.dequantize_rows(rows, x2.dtype))
        return out

    def extra_repr(self) -> str:
        order = ", act-order" if self.perm is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}{order}, bias={self.bias is not None}"
        )


class HalfLinear(nn.Module):
    """y = x W^T + b with W stored in float16 or bfloat16 and x kept in its own dtype (fp32 usually).

    Half the bytes of an fp32 weight, so decoding reads half as much; on CPU the weight is widened
    to fp32 inside the kernel, which is what makes it faster than fp32 where the CPU has no bf16/fp16
    arithmetic (PyTorch's own fp16/bf16 matmuls are slower than fp32 there). `.to(dtype)` keeps the
    weight's 16-bit storage.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype not in (torch.float16, torch.bfloat16) or weight.dim() != 2:
            raise QwenkitError(f"HalfLinear: weight must be a float16/bfloat16 matrix, got {weight.dtype}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.storage_dtype = weight.dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float16) -> HalfLinear:
        """A 16-bit copy of an nn.Linear's weight (and its bias, kept in the linear's dtype)."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach().to(dtype), bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight.dtype != self.storage_dtype:
            self.weight = self.weight.to(self.storage_dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        kernel = (
            x2.device.type == "cpu"
            and x2.shape[0] <= GEMV_MAX_ROWS
            and self.in_features % 16 == 0
            and native_kernels()
            and not x2.requires_grad
        )
        if kernel:
            bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
            y = torch.ops.qwenkit_cpu.half_gemv(x2.float().contiguous(), self.weight, bias)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        if x2.device.type != "cpu" and x.dtype == self.storage_dtype:
            y = F.linear(x2, self.weight)
        else:  # widen a chunk of rows at a time: never a whole float copy
            y = x2.new_empty((x2.shape[0], self.out_features))
            step = chunk_rows(self.in_features, x2.device)
            for start in range(0, self.out_features, step):
                y[:, start : start + step] = F.linear(x2, self.weight[start : start + step].to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.storage_dtype}"


HALF_WEIGHTS = {"fp16": torch.float16, "bf16": torch.bfloat16}  # qwenkit.load(weights=...)


def use_half_weights(model: nn.Module, dtype: torch.dtype = torch.float16, head: bool = True) -> nn.Module:
    """Replace the nn.Linear layers of the blocks (and the head unless head=False) by HalfLinear, in place.

    The model keeps fp32 activations, norms and embeddings; only the big matrices are stored in 16 bits.
    With tied embeddings the head becomes a 16-bit copy next to the fp32 embedding table.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise QwenkitError(f"use_half_weights: dtype must be float16 or bfloat16, got {dtype}")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:  # one at a time, so each fp32 weight is freed as soon as it is replaced
        if name == "lm_head" and not head:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HalfLinear.from_linear(getattr(parent, child), dtype))
    return model


HEAD_KINDS = ("fp16", "bf16", "int8")


def convert_head(model: nn.Module, kind: str) -> nn.Module:
    """Hold the LM head in 16 bits or int8 for decoding, in place; embeddings and blocks untouched.

    Qwen2.5-0.5B's head (151936 x 896, tied to the embeddings) is over a quarter of the weights every
    decoded token reads: 545 MB in fp32, 272 MB as "fp16"/"bf16" (HalfLinear, fp32 activations) and
    137 MB as "int8" (round-to-nearest, symmetric, one scale per vocabulary row: QuantLinear). A tied
    head becomes a copy beside the fp32 embedding table (more memory, fewer bytes read per token).
    For decoding only: `qwenkit.save` of such a model writes the embeddings, not the converted head.
    """
    if kind not in HEAD_KINDS:
        raise QwenkitError(f"head must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    head = model.lm_head
    if type(head) is not nn.Linear:
        raise QwenkitError(
            f"the head is already a {type(head).__name__}; convert_head takes a float nn.Linear"
        )
    if kind == "int8":
        from qwenkit.quant.quantize import PER_CHANNEL, rtn

        bias = None if head.bias is None else head.bias.detach().float()
        converted = QuantLinear.from_weight(rtn(head.weight, 8, PER_CHANNEL), bias)
    else:
        converted = HalfLinear.from_linear(head, torch.float16 if kind == "fp16" else torch.bfloat16)
    model.lm_head = converted.to(head.weight.device)
    return model


# Kinds of linear layer qwenkit_cpu.decode_layers reads (cpu_kernels.cpp, enum LinearKind).
DECODE_F32_ROWS, DECODE_F32_COLS, DECODE_HALF, DECODE_INT8, DECODE_INT4 = range(5)


def decode_operands(module: nn.Module) -> tuple[list[int], list[torch.Tensor | None]] | None:
    """How the native decode step (qwenkit_cpu.decode_layers) reads a packed or 16-bit layer:
    ([kind, group_size, int8_activations], [weight, scales, szeros, bias]), or None when its kernel
    does not apply (act-order columns, a layout the kernels do not take, not on CPU)."""
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.detach().float().contiguous()
    if isinstance(module, QuantLinear):
        if module.perm is not None or not module.kernel_layout or module.qweight.device.type != "cpu":
            return None
        kind = DECODE_INT4 if module.bits == 4 else DECODE_INT8
        ints = [kind, module.group_size, int(module.int8_activations)]
        return ints, [module.qweight, module.scales, module.szeros, bias]
    if isinstance(module, HalfLinear):
        if module.in_features % 16 or module.weight.device.type != "cpu" or not module.weight.is_contiguous():
            return None
        return [DECODE_HALF, 0, 0], [module.weight, None, None, bias]
    return None


def _cat_bias(modules: list[nn.Module], like: torch.Tensor) -> torch.Tensor | None:
    """The modules' biases end to end (zeros for a module without one); None when none has a bias."""
    biases = [m.bias for m in modules]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return torch.cat(
        [b.detach() if b is not None else like.new_zeros(m.out_features, dtype=present[0].dtype)
         for m, b in zip(modules, biases, strict=True)]
    )  # fmt: skip


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """One layer computing torch.cat([m(x) for m in modules], -1), or None when they cannot be fused.

    Decoding calls the fused layer once instead of once per matrix (q/k/v, gate/up): one dispatch and
    one kernel launch, and one activation quantization. Fusable: all QuantLinear with the same bits,
    group size, input size and column order (act-order layers fuse only when their permutations are
    equal, as when quantized as one stacked matrix); all HalfLinear of one storage dtype; all plain
    nn.Linear of one dtype. The fused layer holds copies of the weights, concatenated along outputs.
    """
    if not modules:
        return None
    first = modules[0]
    kind = type(first)
    if kind not in (QuantLinear, HalfLinear, nn.Linear) or any(type(m) is not kind for m in modules):
        return None
    if any(m.in_features != first.in_features for m in modules):
        return None
    if kind is QuantLinear:
        if any(
            (m.bits, m.group_size) != (first.bits, first.group_size)
            or m.int8_activations != first.int8_activations
            or not torch.equal(m.column_group, first.column_group)
            or (m.perm is None) != (first.perm is None)
            or (m.perm is not None and not torch.equal(m.perm, first.perm))
            for m in modules
        ):
            return None
        fused = QuantLinear(
            torch.cat([m.qweight for m in modules]),
            torch.cat([m.scales for m in modules]),
            torch.cat([m.szeros for m in modules]),
            first.column_group.clone(),
            None if first.perm is None else first.perm.clone(),
            _cat_bias(modules, first.scales),
            first.bits,
            first.group_size,
            first.in_features,
        )
        fused.int8_activations = first.int8_activations
        return fused
    if kind is HalfLinear:
        if any(m.storage_dtype != first.storage_dtype for m in modules):
            return None
        return HalfLinear(torch.cat([m.weight for m in modules]), _cat_bias(modules, first.weight))
    # plain nn.Linear
    weights = [m.weight for m in modules]
    if any(w.dtype != weights[0].dtype or w.device != weights[0].device for w in weights):
        return None
    bias = _cat_bias(modules, weights[0])
    fused = torch.nn.utils.skip_init(
        nn.Linear, first.in_features, sum(m.out_features for m in modules), bias=bias is not None,
        device=weights[0].device, dtype=weights[0].dtype,
    )  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([w.detach() for w in weights]))
        if bias is not None:
            fused.bias.copy_(bias)
    return fused.requires_grad_(any(w.requires_grad for w in weights))
