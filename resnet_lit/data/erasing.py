"""Random erasing of a whole batch on its device, each image's rectangle drawn from its sample seed.

The same distribution as ``torchvision.transforms.v2.RandomErasing(p)`` with its defaults (erase with probability
``p`` a rectangle of 2-33% of the area, aspect ratio 0.3-3.3 on a log scale, up to 10 tries to fit one, filled
with 0 after normalisation), but as tensor arithmetic without a host sync, and with draws that depend only on
the sample's seed (:func:`~resnet_lit.data.seeds.seed_uniforms`): a sample is erased the same way in any batch,
on any rank and after any resume.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .seeds import seed_uniforms

ERASING_STREAM = 0xE7A5E  # the seed stream of the erasing draws, apart from the worker's augmentation
SCALE = (0.02, 0.33)
RATIO = (0.3, 3.3)
TRIES = 10


def erasing_boxes(seeds: Tensor, p: float, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(top, left, box height, box width)`` per seed, int64 on the seeds' device; a box of height 0 erases
    nothing (not drawn with probability ``1 - p``, or no try fitted the image)."""
    draws = seed_uniforms(seeds, ERASING_STREAM, 1 + 2 * TRIES + 2)
    apply = draws[:, 0] < p
    area = height * width * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws[:, 1 : 1 + TRIES])
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[:, 1 + TRIES : 1 + 2 * TRIES])
    box_h = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    box_w = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits, as torchvision takes it
    erase = apply & fits.any(dim=1)
    box_h = torch.where(erase, box_h.gather(1, first).squeeze(1), 0)
    box_w = torch.where(erase, box_w.gather(1, first).squeeze(1), 0)
    # Uniform in [0, height - box_h]; the clamp catches a draw just below 1 that float32 rounds up.
    top = torch.minimum((draws[:, -2] * (height - box_h + 1)).to(torch.int64), height - box_h)
    left = torch.minimum((draws[:, -1] * (width - box_w + 1)).to(torch.int64), width - box_w)
    return top, left, box_h, box_w


def random_erasing_(images: Tensor, seeds: Tensor, p: float) -> Tensor:
    """Set each image's seeded rectangle of ``images`` ``[B, C, H, W]`` to 0, in place (``p``: probability per
    image); returns ``images``."""
    height, width = images.shape[-2:]
    top, left, box_h, box_w = erasing_boxes(seeds.to(images.device), p, height, width)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # [B, H]
    inside_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # [B, W]
    mask = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]  # [B, 1, H, W]
    return images.masked_fill_(mask, 0.0)
