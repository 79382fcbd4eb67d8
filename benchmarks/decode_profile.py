"""Where one decoding token's time goes, on CPU at batch 1: qwenkit's decode step split into its
weight matrix-vector products (per weight, against the memory-bandwidth roofline), attention, the
small ops around them, Python and dispatch overhead, and the sampling around the step.

    .venv/bin/python benchmarks/decode_profile.py [--precision fp32|fp16|int8|int4] [--threads 2]
        [--context 256] [--steps 32] [--python] [--unfused]

The model is the random Qwen2.5-0.5B-shaped one of benchmarks/quant_speed.py, laid out as
`qwenkit.load` lays it out on CPU. Method:

- step: `BatchDecoder.decode()` after a prompt of `--context` tokens, median per token; `decode_step`
  alone, the same way (the difference is token picking and the decoder's bookkeeping).
- GEMVs: the linear modules one step calls, recorded with forward hooks and replayed in the same
  order on the same inputs (so each weight streams from memory as it does inside a step), each call
  timed alone; bytes read / time = bandwidth reached, against a STREAM-like 2-thread read.
- the rest of the step (step - GEMVs) is split with torch.profiler: self time of each ATen op
  outside the linear modules, grouped; what is left is Python and dispatch overhead.
- where the whole step runs in C++ (qwenkit.model.NativeDecode, the default where it applies; `--python`
  runs the blocks in Python as before): the GEMVs are the step's products replayed one at a time
  through qwenkit_cpu.decode_linear (the same kernels and threads), the C++ call is timed inside the
  step, and the rest is split into "in C++ besides the GEMVs" (norms, RoPE, attention, SiLU,
  barriers) and "Python around the C++ call" (embedding, positions, masks, dispatch).

Prints a table (ms per token); nothing is written to docs/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import read_bandwidth  # noqa: E402

GEMV_TYPES = (nn.Linear,)


def build_model(preset: str, precision: str):
    import qwenkit
    from qwenkit.model import cpu_decode_layout
    from qwenkit.quant.linear import HalfLinear, QuantLinear, native_kernels, use_half_weights
    from qwenkit.quant.quantize import quantize_model

    global GEMV_TYPES
    GEMV_TYPES = (nn.Linear, HalfLinear, QuantLinear)
    native_kernels()
    model = qwenkit.Qwen(qwenkit.QwenConfig.from_preset(preset))
    model.init_weights(seed=0)
    model.eval()
    with torch.no_grad():  # as qwenkit.load stores the linear weights on CPU
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = cpu_decode_layout(module.weight.data)
    if precision == "fp16":
        use_half_weights(model, torch.float16)
    elif precision in ("int8", "int4"):
        quantize_model(model, precision, quantize_head=True, progress=False)
    return model


def module_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemv_lines(gemv: dict, gemv_s: float, step_s: float, bandwidth: float) -> list[str]:
    """Table rows of the products per weight kind (slowest first) and of all of them together."""
    lines = []
    for kind, (seconds, nbytes, count) in sorted(gemv.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"{'GEMV ' + kind:<28}{seconds * 1e3:>10.2f}{seconds / step_s:>8.0%}{nbytes / 1e6:>9.1f}"
            f"{nbytes / seconds / 1e9:>8.1f}{nbytes / seconds / bandwidth:>7.0%}{count:>7}"
        )
    weight_bytes = sum(e[1] for e in gemv.values())
    lines.append(
        f"{'GEMVs together':<28}{gemv_s * 1e3:>10.2f}{gemv_s / step_s:>8.0%}{weight_bytes / 1e6:>9.1f}"
        f"{weight_bytes / gemv_s / 1e9:>8.1f}{weight_bytes / gemv_s / bandwidth:>7.0%}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per measurement")
    parser.add_argument("--unfused", action="store_true", help="decode without fused projections")
    parser.add_argument("--python", action="store_true", help="run the blocks in Python, not in one C++ call")
    args = parser.parse_args()

    from qwenkit.generation import BatchDecoder, GenerationConfig, RowSettings

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(args.threads)
    model = build_model(args.preset, args.precision)
    if args.unfused:
        model.fused_decode = False
    if args.python:
        model.native_decode = False
    total_steps = 6 * args.steps + 16
    decoder = BatchDecoder(model, 1, args.context + total_steps + 8)
    config = GenerationConfig(max_new_tokens=total_steps, do_sample=False)
    prompt = torch.randint(0, 150000, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder.prefill([0], [prompt], [RowSettings.create(config, "cpu", stop=[])])
    with torch.inference_mode():
        for _ in range(4):
            decoder.decode()
        decode_s = median_time(decoder.decode, args.steps)

        def step():
            tokens = torch.tensor([[decoder.rows[0].last_token]])
            width = decoder.lengths[0] + 1
            logits = model.decode_step(tokens, decoder.cache.first_rows(1), width=width)
            decoder.lengths[0] += 1
            return logits

        step_s = median_time(step, args.steps)
        step()
        native = model._native if model.native_decode and model._native is not None else None
        if native is not None and native.usable:
            print_native(args, bandwidth, model, native, decode_s, step_s, step)
            return

        # The linear modules of one step, in order, with their inputs.
        calls: list[tuple[str, nn.Module, torch.Tensor]] = []
        names = {m: n for n, m in model.named_modules() if isinstance(m, GEMV_TYPES)}
        for i, fused in enumerate(getattr(model, "_fused", [])):  # decode_step's fused projections
            names.update({fused.qkv: f"layers.{i}.qkv_proj", fused.gate_up: f"layers.{i}.gate_up_proj"})
        names.pop(None, None)
        hooks = [
            m.register_forward_pre_hook(lambda mod, inp: calls.append((names[mod], mod, inp[0].clone())))
            for m in names
        ]
        step()
        for h in hooks:
            h.remove()
        per_call = defaultdict(list)
        for _ in range(args.steps):
            for name, module, x in calls:
                start = time.perf_counter()
                module(x)
                per_call[name].append(time.perf_counter() - start)
        gemv = defaultdict(lambda: [0.0, 0, 0])  # kind -> seconds per token, bytes per token, calls
        for name, module, _ in calls:
            entry = gemv[kind_of(name)]
            entry[0] += statistics.median(per_call[name])
            entry[1] += module_bytes(module)
            entry[2] += 1
        gemv_s = sum(e[0] for e in gemv.values())

        linear_modules = {m for _, m, _ in calls}
        wrap_for_profile(linear_modules)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        unwrap(linear_modules)
        ops = defaultdict(float)
        inside_linear = ops_inside(prof, "gemv")
        for event in prof.events():
            if event.id in inside_linear or not event.name.startswith("aten::"):
                continue
            ops[event.name] += event.self_cpu_time_total / 1e6 / args.steps

    rest_s = step_s - gemv_s
    lines = [
        f"{args.preset} {args.precision}, {args.threads} threads, context {args.context}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; fused={not args.unfused}",
        f"decode() per token {decode_s * 1e3:.2f} ms ({1 / decode_s:.2f} tok/s); decode_step alone "
        f"{step_s * 1e3:.2f} ms; picking + bookkeeping {(decode_s - step_s) * 1e3:.2f} ms",
        "",
        f"{'part':<28}{'ms/token':>10}{'share':>8}{'MB':>9}{'GB/s':>8}{'of bw':>7}{'calls':>7}",
    ]
    lines += gemv_lines(gemv, gemv_s, step_s, bandwidth)
    profiled = sum(ops.values())
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"{'  ' + name:<28}{seconds * 1e3:>10.2f}{seconds / step_s:>8.0%}")
    lines.append(f"{'other ops (profiled)':<28}{profiled * 1e3:>10.2f}{profiled / step_s:>8.0%}")
    lines.append(f"{'rest of the step':<28}{rest_s * 1e3:>10.2f}{rest_s / step_s:>8.0%}")
    weight_bytes = sum(e[1] for e in gemv.values())
    roofline = weight_bytes / bandwidth
    lines.append(f"roofline for {weight_bytes / 1e6:.0f} MB of weights: {roofline * 1e3:.2f} ms/token "
                 f"({1 / roofline:.2f} tok/s); step at {roofline / step_s:.0%} of it")  # fmt: skip
    print("\n".join(lines))


def print_native(args, bandwidth, model, native, decode_s, step_s, step) -> None:
    """The table for a step run in one C++ call (NativeDecode)."""
    from qwenkit.model import NativeDecode

    products = native.products()
    inputs = [torch.randn(1, model.config.intermediate_size if "down" in name else
                          model.config.num_attention_heads * model.config.head_dim if "o_proj" in name else
                          model.config.hidden_size) for name, _, _ in products]  # fmt: skip
    per_call = defaultdict(list)
    for _ in range(args.steps):  # in a step's order, so each weight streams from memory as in a step
        for (name, ints, operands), x in zip(products, inputs, strict=True):
            start = time.perf_counter()
            torch.ops.qwenkit_cpu.decode_linear(x, operands, ints)
            per_call[name].append(time.perf_counter() - start)
    gemv = defaultdict(lambda: [0.0, 0, 0])  # kind -> seconds per token, bytes per token, calls
    for name, _, operands in products:
        entry = gemv[kind_of(name)]
        entry[0] += statistics.median(per_call[name])
        entry[1] += sum(t.nbytes for t in operands if t is not None)
        entry[2] += 1
    gemv_s = sum(e[0] for e in gemv.values())
    call_times = []
    original = NativeDecode.__call__

    def timed(self, *a, **k):
        start = time.perf_counter()
        out = original(self, *a, **k)
        call_times.append(time.perf_counter() - start)
        return out

    NativeDecode.__call__ = timed
    try:
        for _ in range(args.steps):
            step()
    finally:
        NativeDecode.__call__ = original
    call_s = statistics.median(call_times)
    lines = [
        f"{args.preset} {args.precision}, {args.threads} threads, context {args.context}; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; the step in one C++ call (NativeDecode)",
        f"decode() per token {decode_s * 1e3:.2f} ms ({1 / decode_s:.2f} tok/s); decode_step alone "
        f"{step_s * 1e3:.2f} ms; picking + bookkeeping {(decode_s - step_s) * 1e3:.2f} ms",
        "",
        f"{'part':<28}{'ms/token':>10}{'share':>8}{'MB':>9}{'GB/s':>8}{'of bw':>7}{'calls':>7}",
    ]
    lines += gemv_lines(gemv, gemv_s, step_s, bandwidth)
    lines.append(
        f"{'in C++ besides the GEMVs':<28}{(call_s - gemv_s) * 1e3:>10.2f}{(call_s - gemv_s) / step_s:>8.0%}"
    )
    lines.append(
        f"{'Python around the C++ call':<28}{(step_s - call_s) * 1e3:>10.2f}{(step_s - call_s) / step_s:>8.0%}"
    )
    weight_bytes = sum(e[1] for e in gemv.values())
    roofline = weight_bytes / bandwidth
    lines.append(f"roofline for {weight_bytes / 1e6:.0f} MB of weights: {roofline * 1e3:.2f} ms/token "
                 f"({1 / roofline:.2f} tok/s); step at {roofline / step_s:.0%} of it")  # fmt: skip
    print("\n".join(lines))


def wrap_for_profile(modules) -> None:
    """Mark each call of these modules as a `gemv` range in the profiler (removed again by unwrap)."""
    for module in modules:
        forward = module.forward

        def marked(*inputs, _forward=forward, **kwargs):
            with torch.profiler.record_function("gemv"):
                return _forward(*inputs, **kwargs)

        module.forward = marked


def unwrap(modules) -> None:
    for module in modules:
        del module.forward


def ops_inside(prof, marker: str) -> set:
    """Ids of the profiler events that run inside a `marker` range (the GEMVs' own time)."""
    inside = set()
    stack = [e for e in prof.events() if e.name == marker]
    while stack:
        event = stack.pop()
        inside.add(event.id)
        stack.extend(event.cpu_children)
    return inside


if __name__ == "__main__":
    main()
