"""Pretraining data: token packing into fixed-length windows (report §2.1)."""

from qwenkit.data.pack import PackedDataset, PackStats, Source, pack_documents, plan_documents

__all__ = ["PackStats", "PackedDataset", "Source", "pack_documents", "plan_documents"]
