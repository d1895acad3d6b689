"""``loader: auto``: the in-memory device path when the device path can run the transforms and the decoded splits
fit a memory budget, else the DataLoader path.

The budget is ``device_memory_fraction`` of the free memory of a CUDA device, and of the available host memory
shared by this host's processes (the device store decodes the splits on the host first; on a CPU run that is
all there is). The decoded size is estimated without decoding: images x channels x height x width x bytes per
value, the height and width being the crop size (or, without one, those of one decoded sample).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .backends import LoaderKind, device_path_refusal
from .splits import RawSplits
from .transforms import ImagePipeline

LoaderSetting = Literal["auto", "dataloader", "device"]
LOADER_SETTINGS: tuple[LoaderSetting, ...] = ("auto", "dataloader", "device")
CIFAR_CROP_PADDING = 4  # the device store keeps the train split zero-padded by this for the random crop
TARGET_BYTES = 8  # int64 label per image


@dataclass(frozen=True)
class LoaderChoice:
    """The loader path and why it was chosen, as logged."""

    kind: LoaderKind
    reason: str

    def message(self) -> str:
        return f"resnet-lit: data.loader auto -> {self.kind} ({self.reason})"


@dataclass(frozen=True)
class DecodedSize:
    """What the device store would hold: ``images`` of ``shape`` (e.g. ``3x32x32 uint8``), ``nbytes`` in all."""

    nbytes: int
    images: int
    shape: str

    def __str__(self) -> str:
        return f"{self.images} images of {self.shape}, {format_bytes(self.nbytes)}"


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``nbytes`` for the store, and where that number comes from."""

    nbytes: int
    source: str

    def __str__(self) -> str:
        return f"{format_bytes(self.nbytes)}: {self.source}"


def choose_loader(
    splits: RawSplits,
    pipeline: ImagePipeline,
    device: torch.device,
    fraction: float,
    processes_per_host: int = 1,
) -> LoaderChoice:
    """The path ``loader: auto`` takes for ``splits`` on ``device``, with the reason."""
    refusal = device_path_refusal(pipeline)
    if refusal is not None:
        return LoaderChoice("dataloader", refusal)
    try:
        size = decoded_size(splits, pipeline)
        budgets = memory_budgets(device, fraction, processes_per_host)
    except Exception as error:  # the DataLoader path works for any data: never fail a run over an estimate
        return LoaderChoice("dataloader", f"could not estimate the in-memory size: {type(error).__name__}: {error}")
    for budget in budgets:
        if size.nbytes > budget.nbytes:
            return LoaderChoice(
                "dataloader",
                f"the decoded splits ({size}) exceed the in-memory budget of {budget}; "
                "a larger data.device_memory_fraction allows more",
            )
    within = " and ".join(str(budget) for budget in budgets)
    return LoaderChoice("device", f"the decoded splits ({size}) fit the in-memory budget of {within}")


def decoded_size(splits: RawSplits, pipeline: ImagePipeline) -> DecodedSize:
    """The size of the splits in the device store, from their lengths and one decoded sample.

    Counts each stored tensor once, as the store builds them: a val split that is also the test split (CIFAR)
    once, and the train split with the zero padding of the CIFAR-style random crop.
    """
    named = [(name, dataset) for name in ("train", "val", "test") if (dataset := getattr(splits, name)) is not None]
    stored: dict[tuple[int, bool], Dataset] = {(id(d), name == "train"): d for name, d in named}
    nonempty = next((d for d in stored.values() if len(d) > 0), None)  # type: ignore[arg-type]
    if nonempty is None:
        return DecodedSize(0, 0, "no images")
    image = v2.functional.to_image(nonempty[0][0]).as_subclass(Tensor)  # one sample, decoded
    channels, (height, width) = (image.shape[0] if image.ndim == 3 else 1), image.shape[-2:]
    if pipeline.crop_size is not None:
        height = width = pipeline.crop_size
    pad = 2 * CIFAR_CROP_PADDING if pipeline.style == "cifar" else 0
    nbytes = images = 0
    for (_, train), dataset in stored.items():
        count = len(dataset)  # type: ignore[arg-type]
        images += count
        pixels = (height + pad) * (width + pad) if train else height * width
        nbytes += count * (channels * pixels * image.element_size() + TARGET_BYTES)
    dtype = str(image.dtype).removeprefix("torch.")
    return DecodedSize(nbytes, images, f"{channels}x{height}x{width} {dtype}")


def memory_budgets(device: torch.device, fraction: float, processes_per_host: int = 1) -> list[MemoryBudget]:
    """The budgets the store must fit: ``fraction`` of the free memory of a CUDA ``device``, and of the available
    host memory divided among ``processes_per_host`` (each process keeps its own copy)."""
    budgets = []
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budgets.append(MemoryBudget(int(free * fraction), f"{fraction:g} of the {format_bytes(free)} free on {device}"))
    available = available_host_memory()
    if available is None:
        budgets.append(MemoryBudget(0, "the available host memory is unknown"))
    else:
        share = f" / {processes_per_host} processes" if processes_per_host > 1 else ""
        budgets.append(
            MemoryBudget(
                int(available * fraction / processes_per_host),
                f"{fraction:g} of the {format_bytes(available)} of available host memory{share}",
            )
        )
    return budgets


def available_host_memory() -> int | None:
    """Bytes of host memory available to new allocations: Linux's MemAvailable, else the free pages; None if
    the system tells neither."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"
