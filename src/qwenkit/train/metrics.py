"""What a run reports: metrics.jsonl (one object per logged step), optional TensorBoard, a loss-curve
PNG, and throughput (tokens per second, and model FLOPs utilization on known GPUs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from qwenkit.errors import QwenkitError
from qwenkit.train.distributed import unwrap


class Metrics:
    """metrics.jsonl (one object per logged step), optional TensorBoard, and a loss-curve PNG."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.file = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.file.exists():  # drop what a killed run logged after its last checkpoint
            kept = [line for line in self.file.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            self.file.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QwenkitError(
                    "log.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def plot(self, png: Path, title: str) -> None:
        """Training (and validation) loss against step."""
        if not self.enabled or not self.file.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second (and MFU on GPUs) over the last logging interval."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        self.start, self.tokens = time.perf_counter(), 0
        result = {"tokens_per_sec": rate}
        if self.peak_flops:
            result["mfu"] = rate * self.flops_per_token / self.peak_flops
        return result


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6N for the matrices (forward + backward) plus attention scores: 12 * layers * hidden * T."""
    config = unwrap(model).config
    matrices = config.num_parameters - config.vocab_size * config.hidden_size  # the embedding is a lookup
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matrices + attention


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU); None on CPU or unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for marker, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if marker in name:
            return flops
    return None
