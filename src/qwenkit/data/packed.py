"""Packed token windows on disk, as `qwenkit.data.pack` writes them: `index.json` and the dataset.

A packed directory holds `train.bin` (and `val.bin`), flat little-endian token arrays (uint16 or
uint32, as `index.json` says) of whole windows of `seq_len + 1` tokens, and `index.json`, which is
written last, so a directory with an index is complete.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    import torch

FORMAT = "qwenkit-packed-tokens"
FORMAT_VERSION = 1
INDEX_FILENAME = "index.json"
SPLITS = ("train", "val")


def read_index(out_dir: str | Path) -> dict:
    """The parsed `index.json` of a packed directory; QwenkitError when missing or malformed."""
    path = Path(out_dir) / INDEX_FILENAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise QwenkitError(f"{path} not found: pack data first with `qwenkit data pack`") from None
    except (OSError, ValueError) as e:
        raise QwenkitError(f"{path}: unreadable index ({e}); pack the data again") from None
    required = ("version", "seq_len", "dtype", "vocab_size", "eod_id", "splits")
    if not isinstance(index, dict) or index.get("format") != FORMAT or any(k not in index for k in required):
        raise QwenkitError(f"{path}: not a qwenkit packed-data index; pack the data again")
    if index["version"] != FORMAT_VERSION:
        raise QwenkitError(f"{path}: format version {index['version']}, this qwenkit reads {FORMAT_VERSION}")
    if index["dtype"] not in ("uint16", "uint32"):
        raise QwenkitError(f"{path}: unknown dtype {index['dtype']!r}")
    return index


class PackedDataset:
    """Windows of one split of a packed directory: item i is a LongTensor of seq_len + 1 tokens.

    The file is memory-mapped on first access, so the dataset pickles cheaply into DataLoader
    workers and each worker maps the file itself.
    """

    def __init__(self, out_dir: str | Path, split: str = "train") -> None:
        self.index = read_index(out_dir)
        if split not in self.index["splits"]:
            names = ", ".join(self.index["splits"])
            raise QwenkitError(f"{out_dir} has no {split!r} split (it has: {names})")
        info = self.index["splits"][split]
        self.path = Path(out_dir) / info["file"]
        self.split = split
        self.seq_len: int = self.index["seq_len"]
        self.vocab_size: int = self.index["vocab_size"]
        self.eod_id: int = self.index["eod_id"]
        self.num_windows: int = info["windows"]
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        expected = self.num_windows * (self.seq_len + 1) * self.dtype.itemsize
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise QwenkitError(f"{self.path} not found; pack the data again") from None
        if size != expected:
            raise QwenkitError(
                f"{self.path} holds {size} bytes, the index says {expected}; the files do not match, pack again"
            )
        self._windows: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> torch.Tensor:
        import torch  # here, not at module level, so the CLI's parser does not load torch

        i = operator.index(i)
        if i < 0:
            i += self.num_windows
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for {self.num_windows} windows")
        if self._windows is None:
            self._windows = np.memmap(
                self.path, dtype=self.dtype, mode="r", shape=(self.num_windows, self.seq_len + 1)
            )
        return torch.from_numpy(self._windows[i].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_windows": None}
