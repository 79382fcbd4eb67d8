"""`qwenkit serve`: the OpenAI-compatible HTTP API (qwenkit.serve.api) run by uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwenkit.cli.common import add_model_arguments, add_verb, load_model
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "serve",
        "serve a model over an OpenAI-compatible HTTP API (continuous batching, streaming, tools)",
        "  qwenkit serve\n"
        "  qwenkit serve --model ./Qwen-7B-Chat --device cuda --dtype bfloat16 --port 8000 --max-batch 32\n"
        "  qwenkit serve --model ./ckpt --host 0.0.0.0 --api-key secret --max-seq-len 4096\n"
        "  qwenkit serve --model ./Qwen2.5-7B-Instruct --kv-memory 8GiB   (or a fraction: --kv-memory 0.5)\n"
        "then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "qwen", "messages": [{"role": "user", "content": "Hello"}]}\'',
    )
    add_model_arguments(p, head=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("QWENKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QWENKIT_API_KEY, "
                        "which keeps the key out of the process list)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests decoded together (KV-cache rows) (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="prompt + reply tokens per request (default: the model's context window)")  # fmt: skip
    p.add_argument("--kv-memory", type=kv_memory_value, metavar="SIZE",
                   help="memory the KV cache may use: a size (2GiB, 512MB) or a fraction (0.3) of the memory "
                        "available after loading the model (GPU: free device memory; CPU: available RAM). "
                        "Requests that do not fit next to the running ones wait; one that cannot fit alone "
                        "is refused (default: the smaller of what --max-batch rows at the full context "
                        "need and 30%% of the available memory)")  # fmt: skip
    p.add_argument(
        "--model-name", metavar="NAME", help="model id the API reports (default: the directory name)"
    )
    p.add_argument("--tool-format", choices=["auto", "react", "hermes"], default="auto",
                   help="tool calls: hermes = the checkpoint's chat template and <tool_call> replies (Qwen2.5), "
                        "react = the original Qwen's ReAct prompt in ChatML; auto = hermes when the chat "
                        "template reads tools, else react (default: %(default)s)")  # fmt: skip
    p.set_defaults(run=run_serve)


def kv_memory_value(text: str) -> int | float:
    from qwenkit.serve.engine import parse_kv_memory  # imports torch: only when the option is given

    try:
        return parse_kv_memory(text)
    except QwenkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve the API until interrupted."""
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise QwenkitError(
            f"--max-seq-len must be >= 1 (or left out for the model's context), got {args.max_seq_len}"
        )
    if not 1 <= args.port <= 65535:
        raise QwenkitError(f"--port must be between 1 and 65535, got {args.port}")
    if not 1 <= args.max_batch <= 1024:
        raise QwenkitError("--max-batch must be between 1 and 1024")
    if args.api_key is not None and not args.api_key.strip():
        raise QwenkitError("--api-key (or QWENKIT_API_KEY) is empty; give a key or leave it unset")
    import uvicorn

    from qwenkit.serve.api import create_app

    model, tokenizer, path = load_model(args)
    name = args.model_name or Path(path).name
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                     max_seq_len=args.max_seq_len, tool_format=args.tool_format,
                     kv_memory=args.kv_memory)  # fmt: skip
    print(f"qwenkit serve: {app.state.engine.kv_summary()}", file=sys.stderr)
    print(
        f"qwenkit serve: {path} as {name!r} on http://{args.host}:{args.port} (max batch {args.max_batch}, "
        f"tool calls: {app.state.tool_format})"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
