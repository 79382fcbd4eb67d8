"""Device names, checked once for every place a device is chosen (loading, training, the CLI).

A device is `cpu`, `cuda`, `cuda:N`, or `auto` (cuda when a GPU is available, else cpu). The name
check needs no torch, so the command line can check `--device` without importing it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    import torch

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: object, setting: str = "device") -> str:
    """`name` when it names a device; else QwenkitError saying what `setting` accepts."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise QwenkitError(f"{setting} must be cpu, cuda or cuda:N (or auto), got {name!r}")
    return name


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a device name ("auto": cuda when available, else cpu); a GPU that was
    asked for must exist."""
    import torch

    if not isinstance(device, torch.device):
        if check_device_name(device) == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QwenkitError(f"device {device} was asked for but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QwenkitError(
                f"device {device} was asked for but only {torch.cuda.device_count()} GPUs exist"
            )
    return device
