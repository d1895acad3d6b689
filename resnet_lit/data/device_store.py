"""The in-memory device path (``loader: device``): the whole uint8 dataset on the training device.

Instead of a DataLoader that decodes, augments and collates images one by one on the CPU, the DataModule's
loaders yield :class:`IndexBatch` es (a few hundred int64 indices). Lightning moves them to the training
device, and the DataModule's ``on_after_batch_transfer`` hook turns them into ``(images, targets)`` with one
batched gather from a device-resident tensor: random crop (zero padding) and horizontal flip as index
arithmetic, then the float conversion and normalisation, all on the device. This is how the fastest
CIFAR-10 trainers avoid the DataLoader.

Guarantees:

* Same order and resume semantics as the standard path: training indices come from the same
  :class:`~resnet_lit.data.samplers.ResumableTrainSampler` (seeded shuffle per epoch, rank sharding, padding,
  mid-epoch resume), evaluation indices from the same in-order shard.
* Augmentation depends only on ``(seed, epoch, index)``: the crop offsets and flip of a sample are derived
  from :func:`~resnet_lit.data.samplers.sample_seed`, computed on the device. A sample's augmentation is the
  same after a resume, at any world size and on any device.
* Without augmentation (eval splits, ``plain``-style datasets) the batches equal the standard path's batches
  up to float rounding (the normalisation is fused into one multiply-add).

Stored images are NHWC, so a gathered batch is already ``channels_last`` (no copy before the network).
Only deterministic geometric work (resize, center crop) is done once, when the store is built, with the
same torchvision functions the standard path uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from .datasets import TensorImageDataset
from .samplers import EvalShardSampler, ResumableTrainSampler, mix_seed

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


class IndexBatch(NamedTuple):
    """What a device-path loader yields: dataset indices of one batch, the split and the epoch they are for."""

    indices: Tensor
    split: str
    epoch: int


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def sample_seeds(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """:func:`~resnet_lit.data.samplers.sample_seed` of every index, vectorised on the indices' device.

    int64 arithmetic wraps modulo 2**64 on CPU and CUDA alike, so this equals ``mix_seed(seed, epoch, i)``
    bit for bit.
    """
    state = _prefix_state(seed, epoch)
    s = (indices.to(torch.int64) ^ _signed(state)) + _signed(_GOLDEN)
    z = (s ^ _shift_right(s, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 1)


def _prefix_state(*values: int) -> int:
    """``mix_seed``'s internal state after absorbing ``values`` (before the last, per-sample value)."""
    state = _GOLDEN
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + _GOLDEN) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        state = z ^ (z >> 31)
    return state


assert _prefix_state(1, 2, 3) >> 1 == mix_seed(1, 2, 3)  # the two implementations must not drift apart


# --- loaders ------------------------------------------------------------------------------------------------
class DeviceTrainLoader:
    """Training index batches from a :class:`ResumableTrainSampler` (Lightning calls ``sampler.set_epoch``).

    With ``device`` the epoch's index order is copied there once, so the batches are already on the training
    device and Lightning's per-step transfer has nothing to copy.
    """

    batch_sampler = None  # DataLoader attributes that Lightning inspects

    def __init__(
        self, sampler: ResumableTrainSampler, batch_size: int, drop_last: bool, device: torch.device | None = None
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[IndexBatch]:
        # Consume the sampler exactly like a DataLoader would (an armed resume is used once).
        armed = self.sampler._armed
        epoch, skip = armed if armed is not None else (self.sampler.epoch, 0)
        self.sampler._armed = None
        order = torch.tensor(self.sampler.epoch_indices(epoch)[skip:], dtype=torch.int64, device=self.device)
        yield from _batches(order, self.batch_size, self.drop_last, "train", epoch)


class DeviceEvalLoader:
    """Evaluation index batches: this rank's in-order shard, the last batch possibly smaller."""

    batch_sampler = None

    def __init__(
        self, sampler: EvalShardSampler, batch_size: int, split: str, device: torch.device | None = None
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.split = split
        self.device = device

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[IndexBatch]:
        order = torch.arange(self.sampler.start, self.sampler.stop, dtype=torch.int64, device=self.device)
        yield from _batches(order, self.batch_size, False, self.split, 0)


def _batches(order: Tensor, batch_size: int, drop_last: bool, split: str, epoch: int) -> Iterator[IndexBatch]:
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield IndexBatch(chunk, split, epoch)


# --- the store ----------------------------------------------------------------------------------------------
@dataclass
class SplitTensors:
    """One split on a device: NHWC images (uint8, or float in [0, 1]) and int64 targets."""

    images: Tensor
    targets: Tensor


class DeviceImageStore:
    """Per-split image tensors, built and moved to the training device on first use; the batched augmentation.

    Args:
        splits: split name -> a function building its CPU tensors (NHWC images, targets), called once.
        mean, std: normalisation per channel (of images scaled to [0, 1]).
        seed: the DataModule seed, for :func:`sample_seeds`.
        crop_padding: zero padding of the random crop of the ``train`` split; 0 disables the crop.
        flip: random horizontal flip of the ``train`` split.
    """

    def __init__(
        self,
        splits: Mapping[str, Callable[[], SplitTensors]],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        crop_padding: int = 0,
        flip: bool = False,
    ) -> None:
        self._builders = dict(splits)
        self._cpu: dict[str, SplitTensors] = {}
        self._on_device: dict[tuple[str, str], SplitTensors] = {}
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = seed
        self.crop_padding = crop_padding
        self.flip = flip
        self._affine: dict[tuple[str, torch.dtype, int], tuple[Tensor, Tensor]] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self._builders)

    def cpu(self, name: str) -> SplitTensors:
        """The split's tensors on the CPU, built (decoded, resized) on the first call."""
        if name not in self._cpu:
            if name not in self._builders:
                raise KeyError(f"no {name!r} split in the device store (splits: {', '.join(self._builders)})")
            self._cpu[name] = self._builders[name]()
        return self._cpu[name]

    def split(self, name: str, device: torch.device) -> SplitTensors:
        """The split's tensors on ``device`` (the train split zero-padded for the random crop)."""
        key = (name, str(device))
        if key not in self._on_device:
            tensors = self.cpu(name)
            images = tensors.images
            if name == "train" and self.crop_padding:
                p = self.crop_padding
                images = torch.nn.functional.pad(images, (0, 0, p, p, p, p))  # NHWC: pad W and H
            # Reuse a tensor already moved for another split (CIFAR's val split is its test split).
            moved = next(
                (t for (n, d), t in self._on_device.items() if d == str(device) and self._cpu[n] is tensors), None
            )
            if moved is not None and not (name == "train" and self.crop_padding):
                self._on_device[key] = moved
            else:
                self._on_device[key] = SplitTensors(images.to(device), tensors.targets.to(device))
        return self._on_device[key]

    def materialize(self, batch: IndexBatch) -> tuple[Tensor, Tensor]:
        """``(normalised float images [B, C, H, W] in channels_last memory, targets [B])`` of an index batch."""
        indices = batch.indices
        data = self.split(batch.split, indices.device)
        if batch.split == "train" and (self.crop_padding or self.flip):
            images = self._augmented(data.images, indices, batch.epoch)
        else:
            images = data.images[indices]
        return self._normalize(images.permute(0, 3, 1, 2)), data.targets[indices]

    def _augmented(self, padded: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """Random crop + flip as one gather: ``[B, H, W, C]`` from the padded ``[N, H+2p, W+2p, C]``."""
        p = self.crop_padding
        height, width = padded.shape[1] - 2 * p, padded.shape[2] - 2 * p
        bits = sample_seeds(self.seed, epoch, indices)
        span = 2 * p + 1
        top, left = bits % span, (bits // span) % span
        rows = top[:, None] + torch.arange(height, device=indices.device)
        cols = torch.arange(width, device=indices.device).expand(len(indices), width)
        if self.flip:
            flipped = ((bits // (span * span)) % 2).bool()
            cols = torch.where(flipped[:, None], width - 1 - cols, cols)
        cols = cols + left[:, None]
        return padded[indices[:, None, None], rows[:, :, None], cols[:, None, :]]

    def _normalize(self, images: Tensor) -> Tensor:
        """``(images * scale - mean) / std`` as one multiply-add; the scale is 1/255 for uint8 images."""
        key = (str(images.device), images.dtype, images.shape[1])
        if key not in self._affine:  # built once per device: a host-to-device copy per batch would sync
            scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
            mean, std = _per_channel(self.mean, images.shape[1]), _per_channel(self.std, images.shape[1])
            multiplier = torch.tensor([scale / s for s in std]).view(1, -1, 1, 1)
            offset = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
            self._affine[key] = (multiplier.to(images.device), offset.to(images.device))
        multiplier, offset = self._affine[key]
        return torch.addcmul(offset, images.float(), multiplier)


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ValueError(f"{len(values)} normalisation values for {channels} channels")


# --- building the store -------------------------------------------------------------------------------------
def deterministic_geometry(
    style: str, *, crop_size: int | None, resize_size: int | None, train: bool
) -> v2.Transform | None:
    """The deterministic geometric steps of :mod:`~resnet_lit.data.transforms`' pipelines, done once per image.

    ``cifar``: train Resize(size) + CenterCrop(size) (the random crop and flip run per batch on the device);
    eval Resize(resize_size) + CenterCrop(size). ``plain``: the optional Resize((size, size)), train and eval.
    """
    if crop_size is None:
        if style == "cifar":
            raise ValueError("the cifar transform style needs an image_size")
        return None
    if style == "plain":
        return v2.Resize((crop_size, crop_size), antialias=True)
    if style == "cifar":
        resize = crop_size if train else (resize_size or crop_size)
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop_size)])
    raise ValueError(f"loader: device does not support the {style!r} transform style")


def dataset_tensors(dataset: Dataset, geometric: v2.Transform | None, num_workers: int = 0) -> SplitTensors:
    """All images of ``dataset`` as one NHWC tensor (uint8 for image files and CIFAR/MNIST, float for tensors).

    ``geometric`` is the deterministic part of the standard pipeline (resize, center crop), applied with the
    same torchvision functions, once. Known in-memory datasets (torchvision CIFAR/MNIST, tensor datasets,
    subsets of them) are converted without a per-image loop; anything else is decoded through a DataLoader
    with ``num_workers`` processes.
    """
    found = _fast_tensors(dataset)
    if found is not None:
        images, targets = found
        if geometric is not None:
            images = geometric(v2.functional.to_image(images)).as_subclass(Tensor)  # batched NCHW resize / crop
        return SplitTensors(images.permute(0, 2, 3, 1).contiguous(), targets)
    return _decode_all(dataset, geometric, num_workers)


def _fast_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(NCHW images, targets)`` read straight from a known in-memory dataset, or None."""
    if isinstance(dataset, Subset):
        inner = _fast_tensors(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return inner[0][index], inner[1][index]
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.targets.to(torch.int64)
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is None or targets is None or getattr(dataset, "transform", None) is not None:
        return None
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8:
        return None
    if images.ndim == 3:  # MNIST: [N, H, W]
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # CIFAR: [N, H, W, C] numpy
        images = images.permute(0, 3, 1, 2)
    else:
        return None
    return images, torch.as_tensor(targets, dtype=torch.int64)


class _Prepared(Dataset):
    def __init__(self, base: Dataset, geometric: v2.Transform) -> None:
        self.base = base
        self.geometric = geometric

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.base[index]
        return self.geometric(image), int(target)


def _decode_all(dataset: Dataset, geometric: v2.Transform | None, num_workers: int) -> SplitTensors:
    transform = v2.Compose([v2.ToImage(), *([geometric] if geometric is not None else [])])
    loader = DataLoader(_Prepared(dataset, transform), batch_size=256, num_workers=num_workers, collate_fn=_stack)
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images.append(batch_images)
        targets.append(batch_targets)
    if not images:
        raise ValueError("cannot build an in-memory store of an empty dataset")
    return SplitTensors(torch.cat(images), torch.cat(targets))


def _stack(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    shapes = {tuple(image.shape) for image, _ in items}
    if len(shapes) != 1:
        raise ValueError(
            f"loader: device needs images of one size after the eval resize/crop, found shapes {sorted(shapes)}"
        )
    images = torch.stack([image.permute(1, 2, 0) for image, _ in items])
    return images, torch.tensor([target for _, target in items], dtype=torch.int64)
