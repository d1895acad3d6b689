"""Dataset wrappers: seeded per-sample transforms, image files with corrupt-file handling, in-memory tensors."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from .errors import CorruptImageError
from .finish import RawImages, SeededRawImages

Transform = Callable[[Any], Any]


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[index][0]``; seeds torch's CPU RNG per sample when given a seed.

    Indices are ``int`` (eval: transform is deterministic) or ``(index, sample_seed)`` pairs from
    :class:`~resnet_lit.data.samplers.ResumableTrainSampler`. Seeding the default CPU generator from the
    pair makes augmentation independent of worker count and worker seeding; the previous generator state
    is restored afterwards so the caller's RNG stream (the main process when ``num_workers=0``) is untouched.
    Only ``torch.default_generator`` is touched (not CUDA), which is the RNG torchvision v2 transforms use.

    With ``raw`` the transform leaves the images unnormalised and items are
    :class:`~resnet_lit.data.finish.RawImages` (eval) or :class:`~resnet_lit.data.finish.SeededRawImages` (with
    the sample seed, for random erasing on the device), which the default collate keeps as batches of that type.
    """

    def __init__(self, base: Dataset, transform: Transform | None, *, raw: bool = False) -> None:
        self.base = base
        self.transform = transform
        self.raw = raw

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, ...]:
        if isinstance(item, tuple):
            index, seed = item
        else:
            index, seed = item, None
        image, target = self.base[index]
        if self.transform is not None:
            image = self._transform(image, seed)
        if not self.raw:
            return image, target
        return RawImages(image, target) if seed is None else SeededRawImages(image, target, seed)

    def _transform(self, image: Any, seed: int | None) -> Any:
        if seed is None:
            return self.transform(image)  # type: ignore[misc]
        saved = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image)  # type: ignore[misc]
        finally:
            torch.default_generator.set_state(saved)


class CorruptCounter:
    """Counts replaced corrupt samples across DataLoader worker processes.

    Backed by a shared-memory int64 tensor with one slot per process (main + workers), so increments never
    race and the count survives fork and spawn. :attr:`value` sums the slots.
    """

    def __init__(self, num_slots: int = 64) -> None:
        self._slots = torch.zeros(num_slots, dtype=torch.int64).share_memory_()

    def increment(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self._slots) - 1)
        self._slots[slot] += 1

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def load_image(path: str, mode: str) -> Image.Image:
    """Decode ``path`` fully into a PIL image of ``mode`` ("RGB" or "L"); raise CorruptImageError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert() forces the full decode, so truncation surfaces here
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise CorruptImageError(
            f"cannot decode image file {path!r} ({type(error).__name__}: {error}); "
            "delete or replace it, or set skip_corrupt: true"
        ) from error


class ImageFileDataset(Dataset):
    """``(PIL image, class index)`` from a list of ``(path, target)`` samples.

    With ``skip_corrupt`` an undecodable file is replaced by the next sample (wrapping around) that decodes,
    deterministically, and :attr:`counter` is incremented; otherwise :class:`CorruptImageError` is raised.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        mode: str = "RGB",
        skip_corrupt: bool = False,
        counter: CorruptCounter | None = None,
    ) -> None:
        self.samples = list(samples)
        self.mode = mode
        self.skip_corrupt = skip_corrupt
        self.counter = counter if counter is not None else CorruptCounter()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        try:
            return load_image(path, self.mode), target
        except CorruptImageError as error:
            if not self.skip_corrupt:
                raise
            # Python shows each distinct message once per process: every bad file is named, once.
            cause = error.__cause__
            warnings.warn(
                f"skip_corrupt: replaced undecodable image file {path!r} by the next decodable sample "
                f"({type(cause).__name__}: {cause})",
                stacklevel=2,
            )
        self.counter.increment()
        for offset in range(1, len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                return load_image(path, self.mode), target
            except CorruptImageError:
                continue
        raise CorruptImageError(f"no decodable image among the {len(self.samples)} files of this split")


class TensorImageDataset(Dataset):
    """``(image tensor [C,H,W], target)`` from in-memory tensors (digits, synthetic data)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])
