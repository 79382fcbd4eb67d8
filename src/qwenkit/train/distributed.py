"""Distribution under torchrun: which process this is and on which device, the process group (NCCL on
GPUs, gloo on CPU), wrapping a model in DDP or FSDP2, and sharing work and results between processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qwenkit.devices import check_device_name
from qwenkit.errors import QwenkitError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of a float over all processes."""
        return self.sum(value)[0] / self.world_size

    def sum(self, *values: float) -> list[float]:
        """Each float summed over all processes."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def share(self, count: int) -> range:
        """This process's items of `count` (its rank, then every world_size-th): the processes' shares
        are disjoint and together hold every item."""
        return range(self.rank, count, self.world_size)

    def close(self) -> None:
        """Wait for every process, then end the process group."""
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device: str | None) -> Distributed:
    """Read torchrun's environment; start the process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device_name("auto" if device is None else device, "train.device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QwenkitError(f"train.device is {device} but no CUDA GPU is available")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, target)


def wrap_model(model: torch.nn.Module, strategy: str, env: Distributed) -> torch.nn.Module:
    """DDP (a full copy per process) or FSDP2 (`fully_shard` per block, then the whole model)."""
    if env.world_size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise QwenkitError(f"train.distributed must be ddp or fsdp, got {strategy!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
