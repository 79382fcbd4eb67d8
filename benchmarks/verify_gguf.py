"""llama.cpp parity of `qwenkit export gguf`: the exported file run by llama.cpp (llama-cpp-python)
against qwenkit on the same checkpoint: tokenizer ids, prompt logits and greedy tokens.

Not part of the test suite: llama-cpp-python compiles llama.cpp at install (about 15 minutes on two
cores). The tests check the file itself with the gguf package's reader; this script checks that
llama.cpp computes the same model from it. Results go to docs/benchmarks.md.

    pip install llama-cpp-python            # CMAKE_ARGS="-DGGML_NATIVE=OFF" for a portable build
    .venv/bin/python benchmarks/verify_gguf.py [--model DIR ...] [--types f32 f16 q8_0] [--tokens 32]

With no --model: the embedded demo model (a qwenkit-trained vocabulary, which llama.cpp's own
converter refuses) and a random tiny model over the official Qwen vocabulary (from the dashscope
package, when installed) in the original Qwen layout.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from report import write_section

import qwenkit
from qwenkit.gguf_export import export_gguf

HEADING = "llama.cpp parity of the GGUF export (`benchmarks/verify_gguf.py`)"
TEXTS = [
    "Hello world! It's a test: def f(x):\n    return x ** 2  # 12345\n",
    "你好，世界。今天天气很好，我们去公园散步吧！",
    "ünïcödé, émojis 🙂🚀, tabs\t\tand   spaces\n\n\nnew lines",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n",
]
PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"


def official_tiny_checkpoint(directory: Path) -> Path | None:
    """A random tiny model over the official vocabulary, written in the original Qwen layout."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_tiny_model, official_vocab_path, randomize_biases
    from test_checkpoint import write_original_layout

    vocab = official_vocab_path()
    if vocab is None:
        return None
    model = randomize_biases(make_tiny_model())
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharper, so greedy choices are not near-ties
    write_original_layout(model, directory, vocab, shards=1)
    return directory


def greedy_qwenkit(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by plain forward passes (no stop tokens, no penalty): the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def compare(directory: Path, kind: str, tokens: int, workdir: Path) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    model, tokenizer = qwenkit.load(directory, dtype="float32")
    gguf_file = export_gguf(directory, workdir / f"{directory.name}-{kind}.gguf", kind)
    # An f32 KV cache (llama.cpp's default is f16), so the logits measure the exported weights alone.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = Llama(
        str(gguf_file), n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=f32, type_v=f32
    )
    plain = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == tokenizer.encode(t) for t in TEXTS)
    special = sum(
        llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer.encode(t, allowed_special="all")
        for t in TEXTS
    )
    prompt = tokenizer.encode(PROMPT, allowed_special="all")
    llm.reset()
    llm.eval(prompt)
    theirs = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].float().numpy()
    ours_greedy, theirs_greedy = greedy_qwenkit(model, prompt, tokens), greedy_llama(llm, prompt, tokens)
    same = next(
        (i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy, strict=True)) if a != b), tokens
    )
    llm.close()
    return {
        "model": directory.name,
        "type": kind,
        "tokenizer": f"{plain}/{len(TEXTS)} plain, {special}/{len(TEXTS)} with special tokens",
        "max_logit_diff": float(np.abs(ours - theirs).max()),
        "logit_scale": float(np.abs(ours).max()),
        "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "greedy_same": f"{same}/{tokens}",
        "text": tokenizer.decode(theirs_greedy)[:60].replace("\n", "\\n").replace("|", "\\|"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", type=Path, help="checkpoint directory (repeatable)")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (compiles llama.cpp)")
        return 2
    version = llama_cpp.__version__
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = args.model or [
            Path(qwenkit.default_model_path()),
            *filter(None, [official_tiny_checkpoint(workdir / "tiny-official-original-layout")]),
        ]
        rows = [compare(Path(m), kind, args.tokens, workdir) for m in models for kind in args.types]
    table = [
        "| model | GGUF type | tokenizer ids equal | max abs logit diff (of max logit) | argmax agree | "
        "greedy tokens equal | llama.cpp's greedy text |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['type']} | {r['tokenizer']} | {r['max_logit_diff']:.2g} ({r['logit_scale']:.3g}) "
            f"| {r['argmax_agree']:.0%} | {r['greedy_same']} | `{r['text']}` |"
        )
    print("\n".join(table))
    body = (
        f"llama-cpp-python {version} (f32 KV cache), torch {torch.__version__}, {platform.machine()} CPU; "
        "qwenkit in float32. "
        "Prompt logits compare every position of a ChatML prompt; greedy tokens are taken without stop tokens.\n\n"
        + "\n".join(table)
    )
    write_section("gguf-llama-cpp", body, heading=HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
