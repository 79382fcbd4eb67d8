"""The in-memory form of a quantized linear weight, shared by loading, quantizing and the kernels.

A weight W [out, in] is stored as integer levels q in 0 .. 2**bits - 1 with one scale and one zero
point per output row and group of input columns: W[o, i] = scales[o, g(i)] * (q[o, i] - zeros[o, g(i)]).
g(i) = i // group_size, or g_idx[i] for act-order (GPTQ desc_act) checkpoints whose groups are not
contiguous. q is kept unpacked (one uint8 per weight) here; the kernels pack it their own way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwenkit.errors import QwenkitError

SUPPORTED_BITS = (4, 8)


@dataclass
class QuantizedWeight:
    """One linear layer's weight, quantized per group of input columns (see the module docstring)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QwenkitError(f"QuantizedWeight: bits must be 4 or 8, got {self.bits}")
        if self.q.dtype != torch.uint8 or self.q.dim() != 2:
            raise QwenkitError(
                f"QuantizedWeight: q must be a uint8 [out, in] tensor, got {self.q.dtype} {list(self.q.shape)}"
            )
        out_features, in_features = self.q.shape
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise QwenkitError(f"QuantizedWeight: group_size must be a positive int, got {self.group_size!r}")
        if self.g_idx is None:
            n_groups = math.ceil(in_features / self.group_size)
        else:
            if self.g_idx.shape != (in_features,) or self.g_idx.dtype.is_floating_point:
                raise QwenkitError(
                    f"QuantizedWeight: g_idx must be an int [{in_features}] tensor, "
                    f"got {self.g_idx.dtype} {list(self.g_idx.shape)}"
                )
            n_groups = self.scales.shape[-1] if self.scales.dim() == 2 else -1
            if in_features and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= n_groups):
                raise QwenkitError(f"QuantizedWeight: g_idx values must lie in 0 .. {n_groups - 1}")
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if not t.dtype.is_floating_point or t.shape != (out_features, n_groups):
                raise QwenkitError(
                    f"QuantizedWeight: {name} must be a float [{out_features}, {n_groups}] tensor, "
                    f"got {t.dtype} {list(t.shape)}"
                )
        if self.bits < 8 and self.q.numel() and int(self.q.max()) >= 1 << self.bits:
            raise QwenkitError(
                f"QuantizedWeight: q has levels above {(1 << self.bits) - 1} for bits={self.bits}"
            )

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def group_index(self) -> torch.Tensor:
        """The group of each input column: g_idx, or i // group_size when the groups are contiguous."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.q.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in]: scales[o, g(i)] * (q[o, i] - zeros[o, g(i)]), computed in fp32."""
        g = self.group_index()
        scales = self.scales.float()[:, g]
        zeros = self.zeros.float()[:, g]
        return (scales * (self.q.float() - zeros)).to(dtype)

    def to(self, device: str | torch.device) -> QuantizedWeight:
        """The same weight with every tensor on `device`."""
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return QuantizedWeight(
            self.q.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.bits,
            self.group_size,
            g_idx,
        )

    def split_outputs(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Cut along the output rows (a fused q/k/v weight into its parts); groups are per row, so exact."""
        if sum(sizes) != self.out_features:
            raise QwenkitError(
                f"QuantizedWeight: split sizes {sizes} do not add up to {self.out_features} outputs"
            )
        parts = zip(self.q.split(sizes), self.scales.split(sizes), self.zeros.split(sizes), strict=True)
        return [QuantizedWeight(q, s, z, self.bits, self.group_size, self.g_idx) for q, s, z in parts]

    def nbytes_packed(self) -> int:
        """Bytes when stored packed: bits/8 per weight and per zero point, the scales as stored, g_idx as int32."""
        n = (self.q.numel() * self.bits + 7) // 8
        n += self.scales.numel() * self.scales.element_size()
        n += (self.zeros.numel() * self.bits + 7) // 8
        if self.g_idx is not None:
            n += self.g_idx.numel() * 4
        return n
