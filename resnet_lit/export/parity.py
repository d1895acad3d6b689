"""The parity check of every export: the artefact, run as a deployer runs it, must give the logits of the checkpoint's
network in eval mode on the same images, within a tolerance relative to the largest logit; else nothing is written.

The images are the data config's own (val split, else test split, finished by the DataModule as in validation) when
they can be loaded, and seeded random images otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lit.data.normalize import Normalizer
from resnet_lit.errors import ResNetLitError
from resnet_lit.export.errors import ParityError

Runner = Callable[[Tensor], Tensor]  # float32 images in [0, 1] -> logits, on the CPU


@dataclass(frozen=True)
class SampleImages:
    """Float32 ``[N, C, H, W]`` images in [0, 1], where they came from (e.g. "7 images of the val split"), and
    whether they were resized from the data's own size."""

    images: Tensor
    source: str
    resized: bool = False


@dataclass(frozen=True)
class ParityReport:
    """The largest absolute logit difference, the largest reference logit magnitude, their ratio and the tolerance."""

    max_abs_diff: float
    max_abs_logit: float
    relative_diff: float
    tolerance: float
    samples: int
    source: str
    batch_sizes: tuple[int, ...]
    top1_agreement: float

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes), "passed": self.passed}

    def describe(self) -> str:
        return (
            f"max |difference| {self.max_abs_diff:.3e} = {self.relative_diff:.3e} of the largest logit "
            f"{self.max_abs_logit:.4g} (tolerance {self.tolerance:.1e}; top-1 agreement {self.top1_agreement:.1%}) "
            f"on {self.source}, batch sizes {', '.join(map(str, self.batch_sizes))}"
        )


def sample_images(
    datamodule: object, count: int, image_size: int | None, in_channels: int, seed: int = 0
) -> SampleImages:
    """``count`` images of the data config's val (else test) split at ``image_size`` (None: as the data gives them),
    or seeded uniform random images when no split can be loaded (the source then says why)."""
    try:
        images, split = _split_images(datamodule, count)
    except (ResNetLitError, OSError, ImportError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        images, split = None, f"data not available: {reason}"
    if images is None:
        if image_size is None:
            raise ResNetLitError(f"export needs --image_size: the data gives no image size ({split})")
        generator = torch.Generator().manual_seed(seed)
        random = torch.rand(count, in_channels, image_size, image_size, generator=generator)
        return SampleImages(random, f"{count} random images ({split})")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
        images = images.clamp_(0.0, 1.0)
        return SampleImages(images.contiguous(), f"{len(images)} images of the {split} split, resized", True)
    return SampleImages(images.contiguous(), f"{len(images)} images of the {split} split")


def _split_images(datamodule: object, count: int) -> tuple[Tensor | None, str]:
    """Up to ``count`` images in [0, 1] of the val or test split, undoing the DataModule's normalisation."""
    pipeline = getattr(datamodule, "pipeline", None)
    if pipeline is None or not hasattr(datamodule, "splits"):
        return None, "the DataModule is not a resnet_lit ImageDataModule"
    for split in ("val", "test"):
        if getattr(datamodule.splits(), split) is None:
            continue
        datamodule.setup("validate" if split == "val" else "test")
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        batches = []
        for batch in loader:
            images, _ = datamodule.on_after_batch_transfer(batch, 0)
            batches.append(images.float().cpu())
            if sum(len(b) for b in batches) >= count:
                break
        normalized = torch.cat(batches)[:count]
        mean, std = Normalizer(pipeline.mean, pipeline.std).constants(torch.device("cpu"), normalized.shape[1])
        return (normalized * std + mean).clamp_(0.0, 1.0).contiguous(), split
    return None, "the data config has neither a val nor a test split"


@torch.no_grad()
def reference_logits(net: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The checkpoint's logits: ``images`` normalised as the training data path does, through ``net`` in eval mode."""
    was_training = net.training
    net.eval()
    try:
        return net(Normalizer(mean, std)(images)).float()
    finally:
        net.train(was_training)


def check_parity(
    reference: Tensor, run: Runner, images: Tensor, batch_sizes: Sequence[int], tolerance: float, source: str
) -> ParityReport:
    """Run the artefact on ``images`` in chunks of each of ``batch_sizes`` and compare with ``reference``."""
    worst = torch.zeros(())
    agree = []
    for batch_size in batch_sizes:
        usable = len(images) - len(images) % batch_size
        for start in range(0, usable, batch_size):
            expected = reference[start : start + batch_size]
            got = torch.as_tensor(run(images[start : start + batch_size])).float()
            if got.shape != expected.shape:
                raise ParityError(f"the exported model returned logits of shape {tuple(got.shape)} for a batch of "
                                  f"{batch_size}, expected {tuple(expected.shape)}")  # fmt: skip
            worst = torch.maximum(worst, (got - expected).abs().max())
            agree.append(got.argmax(1) == expected.argmax(1))
    largest = float(reference.abs().max())
    max_abs = float(worst)
    relative = max_abs / largest if largest > 0 else (0.0 if max_abs == 0 else float("inf"))
    if math.isnan(relative):  # NaN logits fail the check
        relative = float("inf")
    return ParityReport(
        max_abs_diff=max_abs,
        max_abs_logit=largest,
        relative_diff=relative,
        tolerance=tolerance,
        samples=len(images),
        source=source,
        batch_sizes=tuple(batch_sizes),
        top1_agreement=float(torch.cat(agree).float().mean()) if agree else 0.0,
    )
