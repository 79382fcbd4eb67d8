"""qwenkit: the whole Qwen recipe in one readable package.

Names are imported on first use (PEP 562), so `import qwenkit.errors` or `qwenkit --help` does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
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
    """The embedded demo chat model (docs/demo-model.md), used when no model is named."""
    path = Path(__file__).parent / "demo_model"
    if not (path / "config.json").is_file():
        from qwenkit.errors import QwenkitError

        raise QwenkitError(
            f"the embedded demo model is missing from {path}: rebuild it with `make demo-model`"
        )
    return path
