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
import torch

from qwenkit import GenerationConfig, Qwen, QwenConfig, save
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


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level vocabulary (256 tokens plus the special ones), read back from its file."""
    path = tmp_path_factory.mktemp("bytes") / "qwen.tiktoken"
    Tokenizer({bytes([b]): b for b in range(256)}).save(path)
    return Tokenizer.from_file(path)


# --- tiny random models: the same arguments give the same weights -------------------------------------
# Session-scoped models are shared by every test that asks for them: a test that changes one restores
# it (try/finally), and a test that trains or adapts a model builds its own with make_tiny_model.


def make_tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> Qwen:
    """A freshly built random model of a tiny preset (config fields overridden), in eval mode."""
    model = Qwen(QwenConfig.from_preset(preset, **overrides))
    model.init_weights(seed=seed)
    return model.eval()


def randomize_biases(model: Qwen) -> Qwen:
    """Non-zero Q/K/V biases (zero at init), so their wiring and the original layout's split are checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def sharpen(model: Qwen) -> Qwen:
    """Output head x40: a sharper random model, so greedy choices are far from ties."""
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def as_loaded(model: Qwen, tokenizer: Tokenizer) -> Qwen:
    """The generation settings `qwenkit.load` gives: never sample the embedding's padding rows."""
    model.generation_config = GenerationConfig(vocab_size=tokenizer.vocab_size)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> Qwen:
    """The tiny preset (seed 0) with random biases: the model the checkpoint and CLI tests save and load."""
    return randomize_biases(make_tiny_model())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, official_tokenizer) -> Path:
    """`tiny_model` saved once with the official vocabulary."""
    return save(tiny_model, official_tokenizer, tmp_path_factory.mktemp("checkpoints") / "tiny")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """One layer, a byte-level vocabulary: quick to write, load and serve. Tests that damage it copy it."""
    model = make_tiny_model(vocab_size=512, num_hidden_layers=1)
    return save(model, byte_tokenizer, tmp_path_factory.mktemp("small") / "ckpt")


@pytest.fixture(scope="session")
def chat_model() -> Qwen:
    """The tiny preset (seed 1) that the chat and web-page tests talk to."""
    return make_tiny_model(seed=1)


@pytest.fixture(scope="session")
def served_model(official_tokenizer) -> Qwen:
    """The sharpened tiny-gqa model with a 1024-token window, as `qwenkit.load` sets it up: the model
    the decoding core, the serving engine and the server are compared on."""
    model = sharpen(make_tiny_model("tiny-gqa", max_position_embeddings=1024))
    return as_loaded(model, official_tokenizer)


# Qwen2.5's added tokens (QWEN_REFERENCE.md): ids 151643.. in this order; True = special (control).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((name, True) for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                "<|image_pad|>", "<|video_pad|>")),
    *((name, False) for name in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                 "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)  # fmt: skip
HERMES_TEMPLATE = Path(__file__).parent / "data" / "hermes_chat_template.jinja"


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory, official_tokenizer) -> Path:
    """A Qwen2.5-style checkpoint as published, without qwen.tiktoken: a tiny random Qwen2ForCausalLM
    (151,936 embedding rows) saved by transformers, tokenizer.json with the official BPE and Qwen2.5's
    22 added tokens (built with `tokenizers`), tokenizer_config.json and generation_config.json as
    Qwen2.5 ships them, and the Hermes-style tool template of tests/data."""
    import json

    import transformers
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from qwenkit.hf_tokenizer import tokenizer_json

    directory = tmp_path_factory.mktemp("qwen25") / "Qwen2.5-tiny"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)

    # The BPE part and <|endoftext|>, <|im_start|>, <|im_end|> from qwenkit's exporter (cached per
    # tokenizer: other tests export the official vocabulary too), the rest added with the `tokenizers`
    # library itself, each with Qwen2.5's special flag.
    exported = json.loads(tokenizer_json(official_tokenizer))
    exported["added_tokens"] = exported["added_tokens"][:3]
    hf = HFTokenizer.from_str(json.dumps(exported))
    assert [hf.id_to_token(151643 + i) for i in range(3)] == [name for name, _ in QWEN25_ADDED_TOKENS[:3]]
    for name, special in QWEN25_ADDED_TOKENS[3:]:
        hf.add_tokens([AddedToken(name, special=special, normalized=False)])
    hf.save(str(directory / "tokenizer.json"))

    added = {
        str(151643 + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": special}
        for i, (name, special) in enumerate(QWEN25_ADDED_TOKENS)
    }  # fmt: skip
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [name for name, special in QWEN25_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if HERMES_TEMPLATE.is_file():
        tokenizer_config["chat_template"] = HERMES_TEMPLATE.read_text(encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False)
    )
    generation = {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": "4.37.0",
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory


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
