"""Serving throughput and time to first token: continuous batching vs one request at a time.

Starts `qwenkit serve` in a subprocess on a small random model, twice: with --max-batch 16 and with
--max-batch 1 (requests then queue and run one after another, as a server without batching does).
The same clients (threads streaming with httpx, each sending its requests back to back) hit both.
Throughput is generated tokens (the server's own usage counts) per second of wall time; time to
first token runs from sending a request to its first text. Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/serving.py                  # 16 clients, hidden 256, 4 layers
    .venv/bin/python benchmarks/serving.py --clients 8 --max-tokens 32 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from qwenkit import Qwen, QwenConfig, save  # noqa: E402
from qwenkit.tokenizer import Tokenizer  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "watch",
    "from",
    "old",
    "oak",
    "trees",
]


def official_vocab() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


def build_model(directory: Path, hidden: int, layers: int) -> int:
    config = QwenConfig.from_preset(
        "tiny", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
        intermediate_size=hidden * 11 // 4, max_position_embeddings=2048,
    )  # fmt: skip
    model = Qwen(config)
    model.init_weights(seed=0)
    save(model, Tokenizer.from_file(official_vocab()), directory)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "qwenkit", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch", str(max_batch), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # importing torch alone can take a minute on a busy machine
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def one_request(url: str, question: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token in s, generated tokens) of one streamed chat request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


def load(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """Run `clients` threads, each sending its requests back to back; measure the whole."""
    ttfts: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests_per_client):
            words = [WORDS[(c * 7 + r * 3 + i) % len(WORDS)] for i in range(8 + 6 * ((c + r) % 5))]
            ttft, n = one_request(url, " ".join(words), max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens.append(n)

    one_request(url, "warm up", 4)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": sum(tokens) / wall,
        "ttft_median": statistics.median(ttfts),
        "ttft_p90": statistics.quantiles(ttfts, n=10)[-1] if len(ttfts) > 1 else ttfts[0],
        "tokens": sum(tokens),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    parser.add_argument("--runs", type=int, default=2, help="turns per server; medians are reported")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"batched": [], "one at a time": []}
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), args.hidden, args.layers)
        for _ in range(args.runs):  # the two servers take turns, so a busy machine slows both alike
            for name, max_batch in (("batched", args.clients), ("one at a time", 1)):
                process, url = start_server(Path(tmp), max_batch, args.threads)
                try:
                    result = load(url, args.clients, args.requests_per_client, args.max_tokens)
                    idle = [
                        one_request(url, "a single request on an idle server", args.max_tokens)
                        for _ in range(3)
                    ]
                    result["alone_ttft"] = statistics.median(ttft for ttft, _ in idle)
                finally:
                    process.terminate()
                    process.wait()
                runs[name].append(result)
                print(name, json.dumps(result), flush=True)
    results = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()
    }

    b, s = results["batched"], results["one at a time"]

    def per_turn(name: str) -> str:
        return ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[name])

    rows = [
        ("generated tokens/s", b["tokens_per_s"], s["tokens_per_s"], b["tokens_per_s"] / s["tokens_per_s"]),
        ("time to first token, median, s", b["ttft_median"], s["ttft_median"], b["ttft_median"] / s["ttft_median"]),
        ("time to first token, p90, s", b["ttft_p90"], s["ttft_p90"], b["ttft_p90"] / s["ttft_p90"]),
        ("time to first token, idle server, s", b["alone_ttft"], s["alone_ttft"], b["alone_ttft"] / s["alone_ttft"]),
    ]  # fmt: skip
    table = "\n".join(f"| {label} | {x:.3f} | {y:.3f} | {r:.2f}x |" for label, x, y, r in rows)
    body = (
        f"Random model of {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, the "
        f"full 151,936-row vocabulary), float32 on {args.threads} CPU threads, torch {torch.__version__}. "
        f"{args.clients} clients, each streaming {args.requests_per_client} chat requests back to back "
        f"(prompts of 20-50 tokens, up to {args.max_tokens} new tokens, greedy), over HTTP to "
        "`qwenkit serve` in its own process.\n\n"
        "| | --max-batch 16 | --max-batch 1 (one at a time) | ratio |\n|---|---|---|---|\n"
        f"{table}\n\n"
        f"Medians of {args.runs} turns per server (tokens/s per turn: batched "
        f"{per_turn('batched')}; one at a time "
        f"{per_turn('one at a time')}; the machine is shared). Generated {b['tokens']:.0f} and {s['tokens']:.0f} tokens "
        f"in {b['wall']:.1f} s and {s['wall']:.1f} s.\n\n"
        f"Command: `.venv/bin/python benchmarks/serving.py --clients {args.clients} --requests-per-client "
        f"{args.requests_per_client} --max-tokens {args.max_tokens} --hidden {args.hidden} --layers {args.layers} "
        f"--threads {args.threads} --runs {args.runs}`"
    )
    print(body)
    if not args.no_write:
        write_section("serving-cpu", body, heading="Serving: continuous batching (`benchmarks/serving.py`)")


if __name__ == "__main__":
    main()
