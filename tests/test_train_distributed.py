"""How processes share work: every item is one process's, and the shares are as even as can be."""

import pytest

from qwenkit.train.distributed import Distributed


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 5, 8, 13])
def test_shares_are_disjoint_and_hold_everything(count, world_size):
    shares = [list(Distributed(rank=rank, world_size=world_size).share(count)) for rank in range(world_size)]
    everything = [item for share in shares for item in share]
    assert sorted(everything) == list(range(count))  # each item once: disjoint, and nothing left out
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_sums_and_means_are_its_own():
    env = Distributed()
    assert env.sum(1.5, 2.0) == [1.5, 2.0] and env.mean(3.0) == 3.0
