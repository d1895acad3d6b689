"""Samplers: eval sharding, train shuffling/padding, mid-epoch skipping, DataModule resume state."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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


def _fake_trainer(epochs_started: int, batches_processed: int, num_batches: int) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=1,
        global_rank=0,
        num_training_batches=num_batches,
        fit_loop=SimpleNamespace(
            epoch_progress=SimpleNamespace(current=SimpleNamespace(ready=epochs_started)),
            epoch_loop=SimpleNamespace(
                batch_progress=SimpleNamespace(current=SimpleNamespace(processed=batches_processed))
            ),
        ),
    )


def _batches(dm: SyntheticDataModule, epoch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return list(loader)


def test_datamodule_resume_replays_the_rest_of_the_epoch_bitwise() -> None:
    kwargs = {"num_samples": 64, "batch_size": 8, "augment": "trivialaugment", "random_erasing": 0.5, "seed": 5}
    reference = _batches(SyntheticDataModule(**kwargs), epoch=1)
    assert len(reference) == 8

    interrupted = SyntheticDataModule(**kwargs)
    interrupted.trainer = _fake_trainer(epochs_started=2, batches_processed=3, num_batches=8)
    state = interrupted.state_dict()
    assert state == {"seed": 5, "batch_size": 8, "world_size": 1, "epoch": 1, "batches_done": 3}

    resumed = SyntheticDataModule(**{**kwargs, "seed": 0})  # the seed comes back from the checkpoint
    resumed.load_state_dict(state)
    assert resumed.seed == 5
    tail = _batches(resumed, epoch=0)  # a stale set_epoch before iterating must not matter
    assert len(tail) == 5
    for (x, y), (x_ref, y_ref) in zip(tail, reference[3:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_state_dict_after_a_finished_epoch_points_at_the_next_epoch() -> None:
    dm = SyntheticDataModule(num_samples=64, batch_size=8)
    dm.trainer = _fake_trainer(epochs_started=3, batches_processed=8, num_batches=8)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (3, 0)
    dm.trainer = _fake_trainer(epochs_started=0, batches_processed=0, num_batches=8)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (0, 0)


def test_load_state_dict_arms_an_existing_sampler() -> None:
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


def test_state_dict_reads_the_real_trainer_progress(tmp_path: Path) -> None:
    """Guards the Lightning attribute names: a checkpoint taken after 3 batches records epoch 0, 3 batches."""
    dm = SyntheticDataModule(num_classes=2, image_size=4, num_samples=64, batch_size=8, num_val_samples=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
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
    states = {p.name: torch.load(p, weights_only=False)["SyntheticDataModule"] for p in tmp_path.glob("*.ckpt")}
    assert (states["step=3.ckpt"]["epoch"], states["step=3.ckpt"]["batches_done"]) == (0, 3)
    assert (states["step=9.ckpt"]["epoch"], states["step=9.ckpt"]["batches_done"]) == (1, 1)
