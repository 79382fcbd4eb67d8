"""Shared fixtures."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwenkit.tokenizer import Tokenizer


def official_vocab_path() -> Path | None:
    """The official `qwen.tiktoken` shipped in the dashscope package (found without importing it)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def official_tokenizer() -> Tokenizer:
    path = official_vocab_path()
    if path is None:
        pytest.skip("the official qwen.tiktoken (from the dashscope package) is not installed")
    return Tokenizer.from_file(path)


def to_transformers(model):
    """transformers' Qwen2ForCausalLM holding the very same weights as a qwenkit model (the reference)."""
    import transformers

    c = model.config
    hf_config = transformers.Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    hf = transformers.Qwen2ForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), strict=not c.tie_word_embeddings)
    return hf.eval()


def run_until_killed(args: list[str], out: Path, after_step: int) -> None:
    """Start a run in a subprocess and SIGKILL it once it has logged `after_step` steps."""
    process = subprocess.Popen([sys.executable, "-m", "qwenkit", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_step:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


class LiveServer:
    """uvicorn serving an ASGI `app` on a free local port, in a thread (tests drive it over HTTP)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "none"):
        """The official openai client pointed at this server."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
