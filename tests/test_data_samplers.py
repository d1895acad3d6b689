"""Samplers: eval sharding, train shuffling/padding, mid-epoch skipping, DataModule resume state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from resnet_lit.data import EvalShardSampler, ResumableTrainSampler, SyntheticDataModule


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_index_exactly_once(world_size: int) -> None:
    size = 10  # not divisible by 3 or 4
    shards = [list(EvalShardSampler(size, num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(EvalShardSampler(size, num_replicas=world_size, rank=r)) for r in range(world_size)] == [
        len(s) for s in shards
    ]
    assert all(shard == sorted(shard) for shard in shards)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_are_padded_and_cover_the_dataset(world_size: int) -> None:
    size = 11
    samplers = [ResumableTrainSampler(size, num_replicas=world_size, rank=r, seed=3) for r in range(world_size)]
    shards = [[index for index, _ in sampler] for sampler in samplers]
    assert len({len(shard) for shard in shards}) == 1
    assert all(len(shard) == len(sampler) for shard, sampler in zip(shards, samplers, strict=True))
    assert set().union(*shards) == set(range(size))
    assert sum(map(len, shards)) - size < world_size


def test_train_order_depends_only_on_seed_and_epoch() -> None:
    a, b = ResumableTrainSampler(50, seed=1), ResumableTrainSampler(50, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert [i for i, _ in ResumableTrainSampler(50, seed=2)] != [i for i, _ in first]
    seeds = [seed for _, seed in first]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("batches_done", [0, 1, 3])
def test_resume_yields_exactly_the_tail_of_the_epoch(world_size: int, batches_done: int) -> None:
    batch_size, epoch = 4, 2
    for rank in range(world_size):
        full = ResumableTrainSampler(37, num_replicas=world_size, rank=rank, seed=7)
        full.set_epoch(epoch)
        uninterrupted = list(full)
        resumed = ResumableTrainSampler(37, num_replicas=world_size, rank=rank, seed=7)
        resumed.resume(epoch, batches_done, batch_size)
        resumed.set_epoch(0)  # Lightning may call set_epoch before the first iteration starts: armed epoch wins
        assert list(resumed) == uninterrupted[batches_done * batch_size :]
        assert len(resumed) == len(uninterrupted)  # len is the full epoch, also while resuming
        resumed.set_epoch(epoch)
        assert list(resumed) == uninterrupted  # the skip is used once


def _batches(dm: SyntheticDataModule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_datamodule_resume_replays_the_rest_of_the_epoch_bitwise() -> None:
    kwargs = {"num_samples": 64, "batch_size": 8, "augment": "trivialaugment", "random_erasing": 0.5, "seed": 5,
              "loader": "dataloader"}
    reference = _batches(SyntheticDataModule(**kwargs), epoch=1)
    assert len(reference) == 8

    interrupted = SyntheticDataModule(**kwargs)
    loader = interrupted.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    assert loader.state_dict() == {"epoch": 1, "batches_done": 3, "batch_size": 8, "world_size": 1}
    state = interrupted.state_dict()
    assert state == {"seed": 5, "batch_size": 8, "world_size": 1, "loader": "dataloader", "epoch": 1, "batches_done": 3}

    resumed = SyntheticDataModule(**{**kwargs, "seed": 0})  # the seed comes back from the checkpoint
    resumed.load_state_dict(state)
    assert resumed.seed == 5
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)  # Lightning sets the restored epoch before the first batch is drawn
    tail = list(loader)
    assert len(tail) == 5
    for (x, y), (x_ref, y_ref) in zip(tail, reference[3:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert len(list(loader)) == 8  # the restored position is used once


def test_state_dict_after_a_finished_epoch_points_at_the_next_epoch() -> None:
    dm = SyntheticDataModule(num_samples=64, batch_size=8)
    loader = dm.train_dataloader()
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_done"]) == (0, 0)
    loader.sampler.set_epoch(3)
    list(loader)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_done"]) == (4, 0)


def test_a_restored_position_of_another_epoch_is_ignored() -> None:
    """Lightning may move on to the next epoch (e.g. after ``limit_train_batches``): that epoch starts afresh."""
    dm = SyntheticDataModule(num_samples=32, batch_size=4, seed=1)
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches_done": 6, "batch_size": 4, "world_size": 1})
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 8
    loader.load_state_dict({"epoch": 1, "batches_done": 6, "batch_size": 4, "world_size": 1})
    assert len(list(loader)) == 2


def test_resuming_with_another_batch_size_warns() -> None:
    loader = SyntheticDataModule(num_samples=32, batch_size=4).train_dataloader()
    with pytest.warns(UserWarning, match="batch_size/world_size 4/1, but the checkpoint used 8/1"):
        loader.load_state_dict({"epoch": 0, "batches_done": 2, "batch_size": 8, "world_size": 1})


def test_load_state_dict_restores_an_existing_train_loader() -> None:
    dm = SyntheticDataModule(num_samples=32, batch_size=4, seed=1)
    loader = dm.train_dataloader()
    dm.load_state_dict({"seed": 1, "batch_size": 4, "world_size": 1, "epoch": 0, "batches_done": 6})
    assert len(list(loader)) == 2
    assert len(list(loader)) == 8


class _TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 4 * 4, 2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_saves_the_train_loader_position_in_every_checkpoint(tmp_path: Path) -> None:
    """Pins where Lightning keeps a stateful train loader's state: a checkpoint after 3 batches holds epoch 0,
    3 batches; one at the last batch of an epoch holds the start of the next epoch."""
    dm = SyntheticDataModule(num_classes=2, image_size=4, num_samples=64, batch_size=8, num_val_samples=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        use_distributed_sampler=False,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_TinyModel(), datamodule=dm)

    def position(step: int) -> tuple[int, int]:
        saved = torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)
        (state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        copy = saved["SyntheticDataModule"]  # the DataModule's copy, see ImageDataModule.load_state_dict
        assert (copy["epoch"], copy["batches_done"]) == (state["epoch"], state["batches_done"])
        return state["epoch"], state["batches_done"]

    assert [position(step) for step in (3, 8, 9)] == [(0, 3), (1, 0), (1, 1)]
