"""`data.init_args.balanced_sampling: true`: every epoch (as long as the dataset) holds each class equally often,
±1; a small class repeats its samples, each repeat augmented on its own; the order is the same on every rank and a
resumed epoch continues it exactly, on both loader back-ends."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_resume import EVERY_STEP, STEPS_PER_EPOCH, _fit

from fakedata import fed, write_image_folder
from resnet_lit.data import ImageFolderDataModule, ResumableTrainSampler
from resnet_lit.data.balanced import BalancedTrainSampler, report_balance

TARGETS = [0] * 50 + [1] * 20 + [2] * 6 + [3] * 1  # 77 samples: not a multiple of the classes or of 2 or 3 ranks


def _shards(world_size: int, epoch: int, seed: int = 4) -> list[list[tuple[int, int]]]:
    samplers = [BalancedTrainSampler(TARGETS, num_replicas=world_size, rank=r, seed=seed) for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize(("world_size", "epoch_length"), [(1, 77), (2, 78), (3, 78)])
def test_every_epoch_over_all_ranks_holds_each_class_equally_often(world_size: int, epoch_length: int) -> None:
    epochs = []
    for epoch in range(3):
        items = [item for shard in _shards(world_size, epoch) for item in shard]
        counts = Counter(TARGETS[index] for index, _ in items)
        assert sum(counts.values()) == epoch_length  # as long as the unbalanced epoch, padding included
        assert sorted(counts) == [0, 1, 2, 3] and max(counts.values()) - min(counts.values()) <= 1
        appearances = Counter(index for index, _ in items)
        assert appearances[76] == counts[3] >= 19  # the one sample of class 3 repeats
        assert {appearances[i] for i in range(70, 76)} <= {3, 4}  # class 2's six samples: 3 or 4 times each
        assert all(appearances[i] <= 1 for i in range(50))  # class 0: a subset, without replacement
        assert len({seed for _, seed in items}) == len(items)  # every repeat has its own augmentation seed
        epochs.append(items)
    assert epochs[0] != epochs[1] != epochs[2]
    class_0 = [{i for i, _ in items if i < 50} for items in epochs]
    assert class_0[0] != class_0[1]  # another random subset of the large class each epoch


def test_the_extra_slots_go_to_other_classes_in_other_epochs() -> None:
    sampler = BalancedTrainSampler(TARGETS, seed=4)
    assert sampler.slots_per_class == (19, 20)  # 77 = 4 * 19 + 1
    favoured = set()
    for epoch in range(12):
        counts = Counter(TARGETS[i] for i in sampler.epoch_indices(epoch))
        favoured |= {label for label, count in counts.items() if count == 20}
    assert len(favoured) > 1


def test_the_order_depends_only_on_seed_epoch_and_labels() -> None:
    assert _shards(1, 2) == _shards(1, 2)
    assert _shards(1, 2) != _shards(1, 2, seed=5)
    plain = ResumableTrainSampler(len(TARGETS), seed=4)
    assert [i for i, _ in _shards(1, 0)[0]] != [i for i, _ in plain]  # not the unbalanced order


def test_ranks_take_disjoint_slices_of_the_same_balanced_order() -> None:
    ranks = [BalancedTrainSampler(TARGETS, num_replicas=2, rank=r, seed=4) for r in range(2)]
    for epoch in range(2):
        order = ranks[0].epoch_order(epoch)
        assert ranks[1].epoch_order(epoch) == order and len(order) == 78  # drawn at the padded length
        assert [ranks[r].epoch_draws(epoch) for r in range(2)] == [order[0::2], order[1::2]]
        counts = Counter(TARGETS[draw % len(TARGETS)] for draw in order)
        assert sorted(counts.values()) == [19, 19, 20, 20]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("batches_done", [0, 1, 5])
def test_a_resumed_balanced_epoch_yields_exactly_its_tail(world_size: int, batches_done: int) -> None:
    batch_size, epoch = 4, 3
    for rank in range(world_size):
        full = BalancedTrainSampler(TARGETS, num_replicas=world_size, rank=rank, seed=4)
        full.set_epoch(epoch)
        uninterrupted = list(full)
        resumed = BalancedTrainSampler(TARGETS, num_replicas=world_size, rank=rank, seed=4)
        resumed.resume(epoch, batches_done, batch_size)
        resumed.set_epoch(0)  # the armed epoch wins
        assert list(resumed) == uninterrupted[batches_done * batch_size :]
        assert len(resumed) == len(uninterrupted)


def _imbalanced_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        write_image_folder(root, classes=(name,), per_class=count, size=8)
    return root


def _datamodule(root: Path, loader: str, batch_size: int = 4) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), transform_style="cifar", image_size=8, val_fraction=0.0, seed=2,
                                 batch_size=batch_size, drop_last=False, loader=loader,  # type: ignore[arg-type]
                                 balanced_sampling=True)  # fmt: skip


def test_both_back_ends_draw_the_balanced_epoch_with_repeats_augmented_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _imbalanced_folder(tmp_path, {"cat": 12, "dog": 3, "owl": 1})
    labels = {}
    for loader in ("dataloader", "device"):
        dm = _datamodule(root, loader)
        with caplog.at_level(logging.INFO):
            train = dm.train_dataloader()
        assert isinstance(train.sampler, BalancedTrainSampler)
        train.sampler.set_epoch(1)
        images, targets = (torch.cat(parts) for parts in zip(*fed(dm, train), strict=True))
        assert sorted(Counter(targets.tolist()).values()) == [5, 5, 6]  # 16 draws over 3 classes
        owls = images[targets == 2]
        assert len({owl.numpy().tobytes() for owl in owls}) > 1  # the owl's repeats are cropped/flipped apart
        labels[loader] = targets.tolist()
    assert labels["dataloader"] == labels["device"]  # one sampler, one order
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("balanced_sampling")]
    assert reports == 2 * [
        "balanced_sampling: the training split holds cat: 12, dog: 3, owl: 1 (3 classes); each epoch of 16 draws "
        "5 or 6 of every class"
    ]


def test_the_unbalanced_default_keeps_the_plain_sampler(tmp_path: Path) -> None:
    root = _imbalanced_folder(tmp_path, {"cat": 5, "dog": 1})
    dm = ImageFolderDataModule(str(root), transform_style="cifar", image_size=8, val_fraction=0.0, batch_size=2)
    assert type(dm.train_dataloader().sampler) is ResumableTrainSampler


def test_classes_without_a_training_sample_are_left_out_with_a_warning() -> None:
    sampler = BalancedTrainSampler([0, 0, 0, 2], seed=1)
    assert sampler.classes == [0, 2] and sampler.slots_per_class == (2, 2)
    with pytest.warns(UserWarning, match=r"no training sample of the class\(es\) 'dog'; each epoch balances the 2"):
        report_balance(sampler, ["cat", "dog", "owl"])


@pytest.mark.parametrize("loader", ["dataloader", "device"])
def test_a_balanced_fit_resumed_mid_epoch_trains_on_the_uninterrupted_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str
) -> None:
    """The pattern of tests/test_data_resume.py: 3 epochs of 8 steps, a crash at step 11, a resume from last.ckpt."""
    root = _imbalanced_folder(tmp_path / "data", {"cat": 40, "dog": 16, "owl": 6, "yak": 2})  # 64 images
    uninterrupted = _fit(_datamodule(root, loader, batch_size=8), tmp_path / "full", EVERY_STEP)
    assert len(uninterrupted.seen) == 3 * STEPS_PER_EPOCH
    for epoch in range(3):
        steps = range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        labels = torch.cat([uninterrupted.seen[step][1] for step in steps])
        assert torch.bincount(labels).tolist() == [16, 16, 16, 16]

    folder = tmp_path / "run"
    _fit(_datamodule(root, loader, batch_size=8), folder, EVERY_STEP, crash_at=11)
    resumed = _fit(_datamodule(root, loader, batch_size=8), folder, EVERY_STEP, ckpt_path=str(folder / "last.ckpt"))
    assert sorted(resumed.seen) == list(range(11, 3 * STEPS_PER_EPOCH))
    for step, (x, y) in resumed.seen.items():
        assert torch.equal(x, uninterrupted.seen[step][0]) and torch.equal(y, uninterrupted.seen[step][1]), step
