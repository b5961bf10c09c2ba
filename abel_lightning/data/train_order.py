"""The training order, and carrying it across a resume.

Lightning restores a checkpoint's loop counters but starts a plain DataLoader over at its first batch: a run resumed
mid-epoch would train on the epoch's first batches a second time and never on its last ones. ``TrainLoader`` is
stateful in Lightning's sense (``state_dict``/``load_state_dict``, saved in each checkpoint): its state is where the
run is in the training order, and a resumed run's first pass starts there.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from abel_lightning.compat import fit_batch_index


class EpochShuffle(DistributedSampler):
    """A seeded shuffle per epoch, dealt over the ranks, whose next pass can start some batches in.

    The permutation depends on the seed and epoch alone, so global batch ``k`` holds the same examples on any number
    of devices (Lightning keeps a DistributedSampler as it is, on one device too). Each rank's share is cut to whole
    batches.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._skip = 0

    def start_at(self, epoch: int, batches_done: int) -> None:
        """The next pass is epoch ``epoch`` without its first ``batches_done`` batches."""
        self.set_epoch(epoch)
        self._skip = batches_done * self.batch_size

    def __iter__(self):
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter(indices)


class TrainLoader(DataLoader):
    """The training DataLoader of a LightningDataModule: ``EpochShuffle`` order, whole batches, resumable."""

    def __init__(self, dataset, trainer: L.Trainer, batch_size: int, seed: int, **kwargs):
        sampler = EpochShuffle(dataset, trainer.world_size, trainer.global_rank, seed, batch_size)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.trainer = trainer

    def state_dict(self) -> dict:
        # Batches the loop has taken over the whole run (not those Lightning may have prefetched); an epoch is
        # num_training_batches of them, limit_train_batches included.
        epoch, batches_done = divmod(fit_batch_index(self.trainer) + 1, int(self.trainer.num_training_batches))
        return {"epoch": epoch, "batches_done": batches_done, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        here = self._layout()
        if {key: state[key] for key in here} != here:
            raise ValueError(
                f"the checkpoint's run had {_describe(state)}, this one has {_describe(here)}: its place in the "
                "training data means nothing here. Resume with the same devices, data.init_args.batch_size and data, "
                "or start a new run from the saved adapter (model.init_args.adapter)"
            )
        self.sampler.start_at(state["epoch"], state["batches_done"])

    def _layout(self) -> dict:
        return {"world_size": self.trainer.world_size, "batch_size": self.batch_size, "examples": len(self.dataset)}


def _describe(layout: dict) -> str:
    return (
        f"{layout['world_size']} device(s), batch_size {layout['batch_size']}, {layout['examples']} training examples"
    )
