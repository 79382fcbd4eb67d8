"""What `qwenkit quantize` costs in quality on the demo model: perplexity of float, RTN int8/int4 and
GPTQ int8/int4 on held-out text the model was never trained on, and the mean KL divergence from the
float model's next-token distribution (per scored token: the more sensitive measure). Prints a markdown table (the one in
docs/quantization.md).

    python benchmarks/quant_quality.py --samples 64 --seq-len 256

Held-out text: demo conversations drawn with the held-out phrasings (`generate_examples(...,
held_out=True)`, loss on the assistant tokens, as SFT learns them) and pretraining-style documents
of a seed training never used. GPTQ calibrates on demo-style training conversations written to an
SFT JSONL file (`--calibration` as a user passes it), and once on the built-in mix for comparison.
Deterministic: the numbers do not depend on machine load; only the run time does.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qwenkit
from qwenkit.chatml import IGNORE_INDEX, render_messages
from qwenkit.demo.data import generate_examples, pretraining_documents, sft_record
from qwenkit.quant.quantize import calibration_batches, quantize_model

MAX_LEN = 1024
RUNS = (  # label, method, group size, act-order, calibration ("demo" or "builtin")
    ("float", None, None, False, None),
    ("int8 RTN (per channel)", "int8", None, False, None),
    ("int4 RTN (g128)", "int4", 128, False, None),
    ("int4 RTN (g64)", "int4", 64, False, None),
    ("GPTQ int8 (g128)", "gptq-int8", 128, False, "demo"),
    ("GPTQ int4 (g128)", "gptq-int4", 128, False, "demo"),
    ("GPTQ int4 (g128, act-order)", "gptq-int4", 128, True, "demo"),
    ("GPTQ int4 (g64)", "gptq-int4", 64, False, "demo"),
    ("GPTQ int4 (g128), built-in calibration", "gptq-int4", 128, False, "builtin"),
)


def held_out(tokenizer, count: int) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """(chats as (ids, labels), documents as ids), none of them seen in training."""
    chats = []
    for example in generate_examples(count, seed=424242, held_out=True):
        rendered = render_messages(tokenizer, example.messages, example.tools)
        chats.append((rendered.input_ids, rendered.labels))
    documents = [
        tokenizer.encode(text) + [tokenizer.eod_id] for text in pretraining_documents(count, seed=777)
    ]
    return chats, documents


@torch.no_grad()
def score(model, rows: list[tuple[list[int], list[int]]], reference: list[torch.Tensor] | None):
    """(perplexity of the labelled tokens, mean KL(reference || model) per labelled token, the model's
    log-probabilities at those tokens in fp16 to serve as the reference of later runs)."""
    nll, kl, count, logprobs = 0.0, 0.0, 0, []
    for i, (ids, labels) in enumerate(rows):
        logits = model(torch.tensor([ids[:MAX_LEN]]))[0, :-1].float()
        target = torch.tensor(labels[1:MAX_LEN])
        keep = target != IGNORE_INDEX
        if not keep.any():
            logprobs.append(torch.empty(0))
            continue
        lp = torch.log_softmax(logits[keep], dim=-1)
        nll -= lp.gather(1, target[keep, None]).sum().item()
        if reference is not None:
            ref = reference[i].float()
            kl += (ref.exp() * (ref - lp)).sum().item()
        count += int(keep.sum())
        logprobs.append(lp.half())
    return math.exp(nll / count), kl / count, logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the demo model)")
    parser.add_argument("--samples", type=int, default=64, help="GPTQ calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--held-out", type=int, default=100, help="held-out conversations and documents each")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the numbers do not depend on it)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, tokenizer = qwenkit.load(args.model)
    chats, documents = held_out(tokenizer, args.held_out)
    with tempfile.TemporaryDirectory() as tmp:
        calibration_file = Path(tmp) / "calibration.jsonl"
        with open(calibration_file, "w", encoding="utf-8") as f:
            for example in generate_examples(2000, seed=31337):
                f.write(json.dumps(sft_record(example), ensure_ascii=False) + "\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibration = {
                "demo": calibration_batches(tokenizer, calibration_file, args.samples, args.seq_len),
                "builtin": calibration_batches(tokenizer, None, args.samples, args.seq_len),
            }
    print(
        "| weights | chats: ppl | chats: KL to float | documents: ppl | documents: KL to float | quantize time |"
    )
    print("|---|---|---|---|---|---|")
    references: dict[str, list[torch.Tensor] | None] = {"chats": None, "documents": None}
    for label, method, group_size, act_order, source in RUNS:
        model, _ = qwenkit.load(args.model)
        start = time.perf_counter()
        if method is not None:
            quantize_model(
                model,
                method,
                group_size,
                calibration[source] if source else None,
                act_order=act_order,
                progress=False,
            )
        seconds = time.perf_counter() - start
        cells = []
        for key, rows in (("chats", chats), ("documents", [(d, d) for d in documents])):
            ppl, kl, logprobs = score(model, rows, references[key])
            cells += [f"{ppl:.4f}", "" if references[key] is None else f"{kl:.5f}"]
            if references[key] is None:
                references[key] = logprobs  # the float model's: KL of every later run is to it
        timing = f"{seconds:.0f} s" if method else ""
        print(f"| {label} | {' | '.join(cells)} | {timing} |", flush=True)


if __name__ == "__main__":
    main()
