"""The inputs of the runs: synthetic batches, the DataModules of `fit` and the loop on real data, and the
`pipeline` runner, which times the input pipeline alone."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from resnet_lit.bench.config import BenchConfig, RunResult
from resnet_lit.bench.timing import PeakMemory, sync
from resnet_lit.data import ImageDataModule, ImageFolderDataModule, SyntheticDataModule


def synthetic_batches(cfg: BenchConfig, device: torch.device, count: int = 4) -> list[tuple[Tensor, Tensor]]:
    """A few seeded random batches, already on ``device``: the least input work a training step can have."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
        targets = torch.randint(cfg.num_classes, (cfg.batch_size,), generator=generator)
        batches.append((images.to(device), targets.to(device)))
    return batches


def synthetic_data_args(cfg: BenchConfig, num_batches: int) -> dict[str, Any]:
    """`SyntheticDataModule` arguments for ``num_batches`` training batches and one validation batch."""
    return {
        "num_classes": cfg.num_classes,
        "image_size": cfg.image_size,
        "num_samples": cfg.batch_size * num_batches,
        "num_val_samples": cfg.batch_size,
        "num_test_samples": 0,
        "batch_size": cfg.batch_size,
        "loader": cfg.loader,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
    }


def folder_data_args(cfg: BenchConfig) -> dict[str, Any]:
    """`ImageFolderDataModule` arguments for the folder ``cfg.data`` (CIFAR-style transforms up to 64 px)."""
    return {
        "root": cfg.data,
        "transform_style": "cifar" if cfg.image_size <= 64 else "imagenet",
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
        "loader": cfg.loader,
        "val_fraction": 0.02,
    }


def datamodule(cfg: BenchConfig, num_batches: int) -> ImageDataModule:
    """The DataModule of the loop and pipeline runners, the same that ``fit`` builds from its config."""
    if cfg.data == "synthetic":
        return SyntheticDataModule(**synthetic_data_args(cfg, num_batches))
    return ImageFolderDataModule(**folder_data_args(cfg))


def endless(dm: ImageDataModule, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of a DataModule's train loader on ``device``, epoch after epoch (as Lightning would feed them)."""
    loader = dm.train_dataloader()
    for epoch in itertools.count():
        dm.train_sampler.set_epoch(epoch)
        for batch in loader:
            yield dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)


def run_pipeline(cfg: BenchConfig, warmup: int, steps: int) -> RunResult:
    """Only the input pipeline: train batches of the DataModule, moved to the device, no model."""
    device = torch.device(cfg.device)
    batches = endless(datamodule(cfg, warmup + steps + 1), device)
    memory = PeakMemory(device)
    start = last = 0.0
    step_seconds = []
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            memory.start()
            start = last = time.perf_counter()
        next(batches)
        if step >= warmup and device.type == "cpu":
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
    sync(device)
    seconds = time.perf_counter() - start
    batches.close()
    return RunResult(seconds, steps, memory.stop(), step_seconds)
