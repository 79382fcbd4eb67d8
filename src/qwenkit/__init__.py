"""qwenkit: the whole Qwen recipe in one readable package.

Names are imported on first use (PEP 562), so `import qwenkit.errors` or `qwenkit --help` does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

_EXPORTS = {
    "load": "qwenkit.checkpoint",
    "save": "qwenkit.checkpoint",
    "PRESETS": "qwenkit.config",
    "QwenConfig": "qwenkit.config",
    "QwenkitError": "qwenkit.errors",
    "GenerationConfig": "qwenkit.generation",
    "Qwen": "qwenkit.model",
    "Tokenizer": "qwenkit.tokenizer",
}
__all__ = [*_EXPORTS, "chat", "default_model_path"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "chat":
        return importlib.import_module("qwenkit.chat")
    raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")


def default_model_path() -> Path:
    """The model used when none is named.

    Until the demo chat model is built and shipped, this is a tiny randomly initialised model with
    the official vocabulary, made once under $QWENKIT_HOME (default ~/.cache/qwenkit). It runs the
    whole stack but writes nonsense; point --model at a real checkpoint for real answers.
    """
    home = Path(os.environ.get("QWENKIT_HOME", Path.home() / ".cache" / "qwenkit"))
    path = home / "default-model"
    if not (path / "config.json").is_file():
        _build_placeholder_model(path)
    return path


def _build_placeholder_model(path: Path) -> None:
    from importlib.util import find_spec

    from qwenkit.checkpoint import save
    from qwenkit.config import QwenConfig
    from qwenkit.errors import QwenkitError
    from qwenkit.model import Qwen
    from qwenkit.tokenizer import Tokenizer

    spec = find_spec("dashscope")
    vocab = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if vocab is None or not vocab.is_file():
        raise QwenkitError(
            "no model given and no default model yet: pass --model DIR, or install the 'dashscope' "
            "package (it ships the official qwen.tiktoken) so qwenkit can build its placeholder model"
        )
    print(
        f"qwenkit: building the placeholder default model (tiny, random weights) at {path}", file=sys.stderr
    )
    model = Qwen(QwenConfig.from_preset("tiny", max_position_embeddings=8192))
    model.init_weights(seed=0)
    save(model, Tokenizer.from_file(vocab), path)
