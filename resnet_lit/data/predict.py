"""The images of ``predict``: every image file under ``predict_dir``, and with ``skip_corrupt`` the undecodable ones
left out of the batches (no prediction row) and listed at the end."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch.utils.data import Dataset, default_collate

from .backends import LoaderSettings, Placement, eval_dataloader
from .datasets import Transform, load_image
from .errors import CorruptImageError, DataConfigError
from .files import IMAGE_EXTENSIONS, find_images
from .finish import RawImages
from .loaders import SeededDataLoader

MAX_LISTED = 20  # skipped files named in the end-of-predict warning; the rest are counted


class PredictFolderDataset(Dataset):
    """``(transformed image, path)`` for every image under ``root`` (recursive), for ``predict_dataloader``.

    An undecodable file raises :class:`CorruptImageError` naming it; with ``skip_corrupt`` it yields ``None``
    instead and is flagged in shared memory, so that :meth:`skipped_paths` sees the flags set by DataLoader workers.
    With ``raw`` (a transform that leaves the images unnormalised) items are :class:`RawImages`, which the
    training device finishes.
    """

    def __init__(
        self,
        root: str,
        transform: Transform | None,
        *,
        mode: str = "RGB",
        skip_corrupt: bool = False,
        raw: bool = False,
    ) -> None:
        if not os.path.isdir(root):
            raise DataConfigError(f"predict_dir {root!r} does not exist or is not a directory")
        self.paths = find_images(root)
        if not self.paths:
            raise DataConfigError(f"predict_dir {root!r} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.transform = transform
        self.mode = mode
        self.skip_corrupt = skip_corrupt
        self.raw = raw
        self._skipped = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        path = self.paths[index]
        try:
            image = load_image(path, self.mode)
        except CorruptImageError as error:
            if not self.skip_corrupt:
                raise
            self._skipped[index] = True
            cause = error.__cause__
            warnings.warn(
                f"skip_corrupt: no prediction for undecodable image file {path!r} ({type(cause).__name__}: {cause})",
                stacklevel=2,
            )
            return None
        image = self.transform(image) if self.transform is not None else image
        return RawImages(image, path) if self.raw else (image, path)

    def skipped_paths(self) -> list[str]:
        """The files left out so far, in order."""
        return [self.paths[i] for i in self._skipped.nonzero().flatten().tolist()]


def collate_decoded(items: list[tuple[Any, str] | None]) -> Any:
    """The default batch of the decoded items; ``None`` when every item of the batch was left out."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


class PredictDataLoader(SeededDataLoader):
    """The predict loader: batches without the left-out files (collated by :func:`collate_decoded`), and no
    batch at all where every file of one was left out."""

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch in super().__iter__() if batch is not None)


def warn_predict_skipped(paths: list[str]) -> None:
    """One warning listing the files that ``predict`` left out (the first :data:`MAX_LISTED` by name)."""
    listed = ", ".join(repr(path) for path in paths[:MAX_LISTED])
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    warnings.warn(
        f"skip_corrupt: {len(paths)} undecodable image file(s) have no prediction: {listed}{more}", stacklevel=2
    )


def predict_dataloader(dataset: PredictFolderDataset, settings: LoaderSettings, place: Placement) -> PredictDataLoader:
    """The in-order predict loader over this rank's shard of ``dataset``."""
    loader = eval_dataloader(dataset, settings, place, loader_cls=PredictDataLoader, collate_fn=collate_decoded)
    return cast(PredictDataLoader, loader)
