"""Each decoding matrix-vector product alone: qwenkit's packed-weight layers (int8, int4, 16-bit) and
fp32 nn.Linear at the Qwen2.5-0.5B shapes, in GB/s of weight bytes read against the read roofline.

One input row (batch 1 decoding), the layer called as the model calls it (forward: Python, dispatch,
the kernel, the bias). Each call starts cold, as in decoding, where a layer's weights were last read
a whole token ago: 64 MB of other data are read before it (the caches hold 32 MB), and only the call
is timed; median of the calls of a round, best of `--rounds` rounds that take turns over the layers,
so a noisy machine slows all alike. Bytes = the layer's weight tensors (levels, scales, scales x
zeros); the roofline is the same STREAM-like read as benchmarks/quant_speed.py.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 2] [--rounds 5] [--compare FILE]

`--compare FILE` also times another version of qwenkit/quant/linear.py (for example an older one
from `git show`, its kernel file next to it under another extension name) side by side.

Rows named "step: ..." run the same weights as the one-call decode step does
(`qwenkit_cpu.decode_linear`: its thread team, its fp32 row- and column-major kernels; the
column-major fp32 weight is the layout `cpu_decode_layout` gives wide matrices). Called alone
after the 64 MB flush, each such call also wakes the team's worker, asleep by then (a decoding step
wakes it once per token, then it spins between products): the small matrices' step rows are
mostly that wake-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from quant_speed import read_bandwidth  # benchmarks/ is on sys.path when a script there runs

from qwenkit.quant.weights import QuantizedWeight

SHAPES = {  # (in, out) of Qwen2.5-0.5B's matrices
    "q/o 896->896": (896, 896),
    "k/v 896->128": (896, 128),
    "gate/up 896->4864": (896, 4864),
    "down 4864->896": (4864, 896),
    "head 896->151936": (896, 151936),
}


def random_quantized(out: int, inp: int, bits: int, group_size: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(0)
    groups = inp // group_size
    q = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand((out, groups), generator=g) * 0.01 + 0.001
    return QuantizedWeight(q, scales, torch.full((out, groups), float(2 ** (bits - 1))), bits, group_size)


def layers(linear_module, inp: int, out: int) -> dict[str, torch.nn.Module]:
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)) * 0.02
    return {
        "fp32": torch.nn.Linear(inp, out, bias=False).requires_grad_(False),
        "fp16": linear_module.HalfLinear(weight.half()),
        "int8": linear_module.QuantLinear.from_weight(random_quantized(out, inp, 8, inp)),
        "int4 g128": linear_module.QuantLinear.from_weight(random_quantized(out, inp, 4, 128)),
    }


class StepProduct(torch.nn.Module):
    """A layer called as the one-call decode step calls it (qwenkit_cpu.decode_linear)."""

    def __init__(self, layer: torch.nn.Module, column_major: bool = False):
        super().__init__()
        from qwenkit.model import _float_operands, cpu_decode_layout

        if column_major:
            layer.weight.data = cpu_decode_layout(layer.weight.data)
            assert not layer.weight.is_contiguous() or layer.out_features < 2 * layer.in_features
        self.layer = layer
        self.ints, self.operands = _float_operands(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qwenkit_cpu.decode_linear(x, self.operands, self.ints)


def step_layers(built: dict[str, torch.nn.Module], inp: int, out: int) -> dict[str, torch.nn.Module]:
    """The decode step's way of calling each layer of `built` that it reads."""
    rows = {}
    for name, layer in built.items():
        from qwenkit.model import _float_operands

        if _float_operands(layer) is not None:
            rows[f"step: {name}"] = StepProduct(layer)
    if out >= 2 * inp:  # what cpu_decode_layout stores column-major
        wide = torch.nn.Linear(inp, out, bias=False).requires_grad_(False)
        rows["step: fp32 column-major"] = StepProduct(wide, column_major=True)
    return rows


def weight_bytes(layer: torch.nn.Module) -> int:
    skip = {"column_group", "perm", "bias"}
    tensors = (*layer.named_parameters(), *layer.named_buffers())
    return sum(t.nbytes for n, t in tensors if n.rsplit(".", 1)[-1] not in skip)


EVICT = torch.ones(1 << 24)  # 64 MB, twice the last-level cache


def time_call(layer: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    """Median seconds of a cold call (caches flushed before each): 5 to 50 calls, about `seconds`."""
    layer(x)
    times: list[float] = []
    while (sum(times) < seconds and len(times) < 50) or len(times) < 5:
        EVICT.sum()
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("compared_linear", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.native_kernels()
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.05, help="timed calls per measurement")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--compare", help="another linear.py to time side by side")
    args = parser.parse_args()

    from qwenkit.quant import linear

    linear.native_kernels()
    modules = {"": linear}
    if args.compare:
        modules["compared "] = load_module(args.compare)
    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bandwidth / 1e9:.1f} GB/s")
    print("| shape | layer | us / call | MB read | GB/s | of roofline |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for shape in args.shapes:
            inp, out = SHAPES[shape]
            built = {prefix + name: layer for prefix, module in modules.items()
                     for name, layer in layers(module, inp, out).items()}  # fmt: skip
            built.update(step_layers(layers(linear, inp, out), inp, out))
            x = torch.randn(1, inp)
            best = {name: float("inf") for name in built}
            for _ in range(args.rounds):
                for name, layer in built.items():
                    best[name] = min(best[name], time_call(layer, x, args.seconds))
            for name, layer in built.items():
                size = weight_bytes(layer)
                rate = size / best[name]
                print(
                    f"| {shape} | {name} | {best[name] * 1e6:.1f} | {size / 1e6:.2f} | {rate / 1e9:.1f} | "
                    f"{rate / bandwidth:.0%} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
