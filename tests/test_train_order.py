"""The training order: the same global batches on any device count, and a resume that goes on from its place."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from abel_lightning.data.train_order import TrainLoader


def trainer(world_size: int = 1, rank: int = 0, batches_taken: int = 0, per_epoch: int = 5):
    loop = SimpleNamespace(total_batch_idx=batches_taken - 1)
    return SimpleNamespace(world_size=world_size, global_rank=rank, fit_loop=loop, num_training_batches=per_epoch)


def passes(loader: TrainLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def test_global_batches_are_the_same_examples_on_one_device_and_on_two():
    one = passes(TrainLoader(list(range(10)), trainer(), batch_size=2, seed=3), epoch=0)
    ranks = [passes(TrainLoader(list(range(10)), trainer(2, r), batch_size=1, seed=3), epoch=0) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(batch) for batch in one]
    assert sorted(sum(one, [])) == list(range(10))
    assert passes(TrainLoader(list(range(10)), trainer(), batch_size=2, seed=3), epoch=1) != one


def test_a_resumed_loader_starts_after_the_batches_its_run_took():
    straight = TrainLoader(list(range(11)), trainer(), batch_size=2, seed=0)  # 5 whole batches an epoch
    epochs = [passes(straight, 0), passes(straight, 1)]
    # The run took all of epoch 0 and 2 batches of epoch 1, then saved.
    state = TrainLoader(list(range(11)), trainer(batches_taken=7), batch_size=2, seed=0).state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 2

    resumed = TrainLoader(list(range(11)), trainer(), batch_size=2, seed=0)
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == epochs[1][2:]
    assert passes(resumed, 2) == passes(straight, 2)  # later epochs are whole again


def test_resuming_on_another_device_count_says_what_to_do():
    state = TrainLoader(list(range(12)), trainer(2, 0, batches_taken=3), batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"2 device\(s\), batch_size 2, 12 .* 1 device\(s\).*same devices"):
        TrainLoader(list(range(12)), trainer(), batch_size=2, seed=0).load_state_dict(state)
