"""The shared loop's held-out evaluation: the batches split between processes, each counted once."""

import math

import pytest
import torch

from qwenkit.train.distributed import Distributed
from qwenkit.train.loop import Task, evaluate


class OneProcessOf(Distributed):
    """One process of several without a process group: what it would all-reduce is recorded (and the
    tests read that, not the result, which needs the other processes)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank=rank, world_size=world_size)
        self.reduced: list[list[float]] = []

    def sum(self, *values: float) -> list[float]:
        self.reduced.append(list(values))
        return [1.0 for _ in values]


def held_out_task(size: int, seen: list) -> Task:
    """Held-out samples 0..size-1; a batch's loss is the mean of its sample numbers."""

    def loss(model, batch):
        seen.append(batch[0].tolist())
        return batch[0].float().mean()

    samples = [torch.tensor(i) for i in range(size)]
    collate = lambda rows: (torch.stack(rows),)  # noqa: E731
    return Task("test", torch.nn.Identity(), None, samples, samples, collate, seq_len=1, loss=loss)


def test_one_process_evaluates_the_first_batches_including_a_short_last_one():
    seen = []
    assert evaluate(torch.nn.Identity(), held_out_task(11, seen), 2, 3, Distributed()) == {
        "loss": pytest.approx(2.5)
    }
    assert seen == [[0, 1], [2, 3], [4, 5]]  # eval.batches = 3 of the 6
    seen.clear()
    loss = evaluate(torch.nn.Identity(), held_out_task(11, seen), 2, 8, Distributed())["loss"]
    assert seen[-1] == [10] and loss == pytest.approx((0.5 + 2.5 + 4.5 + 6.5 + 8.5 + 10) / 6)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_processes_share_the_batches_and_give_the_one_process_loss(world_size):
    micro, batches = 2, 5  # samples 0..9 in 5 batches; sample 10 is past eval.batches
    alone = evaluate(torch.nn.Identity(), held_out_task(11, []), micro, batches, Distributed())["loss"]
    totals, counted, passes = 0.0, 0, set()
    for rank in range(world_size):
        env, seen = OneProcessOf(rank, world_size), []
        evaluate(torch.nn.Identity(), held_out_task(11, seen), micro, batches, env)
        ((total, count),) = env.reduced
        share = list(env.share(batches))
        assert count == len(share)
        assert seen[: len(share)] == [[2 * b, 2 * b + 1] for b in share]  # its own batches, in order
        totals, counted = totals + total, counted + count
        passes.add(len(seen))
    assert passes == {math.ceil(batches / world_size)}  # as many forward passes on every process (FSDP)
    assert counted == batches and totals / counted == pytest.approx(alone)


def test_extra_metrics_of_a_task_are_averaged_beside_the_loss():
    task = held_out_task(6, [])
    plain = task.loss
    task.loss = lambda model, batch: (plain(model, batch), {"largest": batch[0].max().float()})
    assert evaluate(torch.nn.Identity(), task, 2, 8, Distributed()) == {
        "loss": pytest.approx((0.5 + 2.5 + 4.5) / 3),
        "largest": pytest.approx((1 + 3 + 5) / 3),
    }


def test_no_held_out_samples_no_evaluation():
    task = held_out_task(4, [])
    task.held_out = []
    assert evaluate(torch.nn.Identity(), task, 2, 8, Distributed()) is None
