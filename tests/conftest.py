"""Shared fixtures."""

import importlib.util
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
