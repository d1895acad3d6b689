"""Per-channel normalisation of image batches on their own device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import DataConfigError


class Normalizer:
    """``(images / 255 - mean) / std`` for uint8 images, ``(images - mean) / std`` for float images in [0, 1], as
    float32 in channels_last memory.

    The operations and their order are those of the workers' ``ToDtype(float32, scale=True)`` and
    ``Normalize(mean, std)``, so on the CPU the result equals theirs bit for bit. Mean and std are copied to a
    device once: a host-to-device copy per batch would make the host wait for the device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._constants: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        """Normalised float32 ``[B, C, H, W]`` of ``images`` (uint8, or float in [0, 1]); never in place."""
        mean, std = self.constants(images.device, images.shape[1])
        if images.dtype == torch.uint8:
            scaled = images.to(torch.float32, memory_format=torch.channels_last).mul_(1.0 / 255)
            return scaled.sub_(mean).div_(std)
        return images.to(torch.float32, memory_format=torch.channels_last).sub(mean).div_(std)

    def constants(self, device: torch.device, channels: int) -> tuple[Tensor, Tensor]:
        """Mean and std as float32 ``[1, C, 1, 1]`` on ``device``, made on the first call."""
        key = (str(device), channels)
        if key not in self._constants:
            mean, std = per_channel("mean", self.mean, channels), per_channel("std", self.std, channels)
            self._constants[key] = tuple(  # type: ignore[assignment]
                torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device) for values in (mean, std)
            )
        return self._constants[key]


def per_channel(name: str, values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: as given, or one value repeated."""
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise DataConfigError(f"{name} has {len(values)} values for images of {channels} channels; give 1 or {channels}")
