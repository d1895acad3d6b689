"""Augmentation randomness depends only on (seed, epoch, index): not on workers, processes or the caller's RNG."""

from __future__ import annotations

import torch

from resnet_lit.data import SeededTransformDataset, SyntheticDataModule

KWARGS = {"num_samples": 48, "batch_size": 8, "augment": "randaugment", "random_erasing": 0.5, "seed": 11,
          "loader": "dataloader"}


def _epoch(num_workers: int, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = SyntheticDataModule(**KWARGS, num_workers=num_workers).train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_batches_with_and_without_workers() -> None:
    _assert_same(_epoch(0), _epoch(2))


def test_same_batches_across_fresh_datamodules_and_global_seeds() -> None:
    torch.manual_seed(1)
    first = _epoch(0, epoch=1)
    torch.manual_seed(2)
    _assert_same(first, _epoch(0, epoch=1))


def _images_by_index(epoch: int, **overrides: object) -> dict[int, torch.Tensor]:
    loader = SyntheticDataModule(**{**KWARGS, **overrides}).train_dataloader()
    loader.sampler.set_epoch(epoch)
    images = torch.cat([x for x, _ in loader])
    return dict(zip(loader.sampler.epoch_indices(epoch), images, strict=True))


def test_augmentation_changes_between_epochs() -> None:
    """The same image is augmented differently in another epoch (not merely drawn in another order)."""
    a, b = _images_by_index(0), _images_by_index(1)
    assert a.keys() == b.keys() == set(range(KWARGS["num_samples"]))
    assert sum(not torch.equal(a[i], b[i]) for i in a) >= 0.9 * len(a)
    plain = {"augment": "none", "random_erasing": 0.0}
    plain_a, plain_b = _images_by_index(0, **plain), _images_by_index(1, **plain)
    assert all(torch.equal(plain_a[i], plain_b[i]) for i in plain_a)  # without augmentation: the same images


def test_seeding_leaves_the_callers_rng_untouched() -> None:
    dataset = SeededTransformDataset(SyntheticDataModule(**KWARGS).splits().train, lambda x: x + torch.rand(1))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = dataset[(0, 123)][0]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(first, dataset[(0, 123)][0])
    assert not torch.equal(first, dataset[(0, 124)][0])
