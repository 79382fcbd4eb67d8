"""Pretraining data: one document reader (readers.py), packing into fixed-length windows with its
sampling plan (pack.py, report §2.1), and the packed windows as a dataset (packed.py)."""

from qwenkit.data.pack import PackStats, Source, pack_documents, plan_documents
from qwenkit.data.packed import PackedDataset
from qwenkit.data.readers import read_documents

__all__ = ["PackStats", "PackedDataset", "Source", "pack_documents", "plan_documents", "read_documents"]
