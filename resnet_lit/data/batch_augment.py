"""TrivialAugmentWide and RandAugment on whole uint8 batches on their device (``loader: device``), each image with
its own op, magnitude and sign drawn from its sample seed.

The ops, their magnitude ranges and the draws are torchvision's ``transforms.v2.TrivialAugmentWide()`` and
``RandAugment()`` with their defaults (31 magnitude bins, nearest interpolation, fill 0), and each op repeats
torchvision's float arithmetic, so an image given the same op and magnitude comes out as torchvision makes it
(``tests/test_batch_augment.py`` compares them op by op). A batch runs every kind of op once, for all its images,
with identity parameters for the images that drew another kind:

* point ops (Identity, Brightness, Contrast, Posterize, Solarize, AutoContrast, Equalize): a table of 256 values
  per image and channel, applied in one gather;
* geometric ops (ShearX/Y, TranslateX/Y, Rotate): an inverse affine matrix per image and one ``grid_sample``;
* Color (a blend with the grey image) and Sharpness (a blend with the smoothed image): one pass each.

Nothing reads tensor values on the host or branches on them in Python, so on a GPU no batch waits for one.
The draws are :func:`~resnet_lit.data.seeds.seed_uniforms` of the sample seeds, a function of the seed alone:
a sample is augmented the same way in any batch, on any rank and after any resume.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataConfigError
from .seeds import seed_uniforms
from .transforms import Augment

Policy = Literal["trivialaugment", "randaugment"]

AUGMENT_STREAM = 0xA4A6  # the seed stream of the op draws, apart from the crop/flip bits and the erasing draws
BINS = 31  # torchvision's num_magnitude_bins
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # fmt: skip  # torchvision's order
SIGNED = frozenset(("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"))  # fmt: skip
GEOMETRIC = frozenset(("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
# The point ops, in the order of their lookup tables (index 0 is the identity of every other op).
POINT_OPS = ("Identity", "Brightness", "Contrast", "Posterize", "Solarize", "AutoContrast", "Equalize")
# Columns of the per-op parameter table (float32).
KIND, POINT_A, POINT_B, COLOR_RATIO, COLOR_ALPHA, SHARP_ALPHA = range(6)


def magnitudes(policy: Policy, op: str, height: int, width: int) -> list[float] | None:
    """The 31 magnitudes of ``op`` under ``policy`` as torchvision computes them (float32 values), or None for the
    ops without one. RandAugment's translation is relative to the image size, TrivialAugmentWide's 32 pixels."""
    wide = policy == "trivialaugment"
    if op in ("ShearX", "ShearY"):
        return _linspace(0.0, 0.99 if wide else 0.3)
    if op in ("TranslateX", "TranslateY"):
        side = width if op == "TranslateX" else height
        return _linspace(0.0, 32.0 if wide else 150.0 / 331.0 * side)
    if op == "Rotate":
        return _linspace(0.0, 135.0 if wide else 30.0)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _linspace(0.0, 0.99 if wide else 0.9)
    if op == "Posterize":  # bits kept: 8 down to 2 (wide) or 4
        return (8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4)))).round().int().double().tolist()
    if op == "Solarize":  # the threshold as a fraction of 255, 1 down to 0
        return _linspace(1.0, 0.0)
    return None


def _linspace(start: float, end: float) -> list[float]:
    return torch.linspace(start, end, BINS).double().tolist()


def trivial_augment(images: Tensor, seeds: Tensor) -> Tensor:
    """TrivialAugmentWide of each uint8 image ``[B, C, H, W]`` (C = 1 or 3): one op drawn uniformly, a magnitude bin
    drawn uniformly, a random sign for the signed ops, all from the image's seed; returns a new uint8 batch."""
    op, magnitude_bin, negative = trivial_augment_draws(seeds.to(images.device))
    return apply_ops(images, "trivialaugment", op, magnitude_bin, negative)


def rand_augment(images: Tensor, seeds: Tensor, num_ops: int = 2, magnitude: int = 9) -> Tensor:
    """RandAugment of each uint8 image ``[B, C, H, W]``: ``num_ops`` ops drawn uniformly and applied in sequence, each
    at magnitude bin ``magnitude`` of 31 with a random sign, all from the image's seed; returns a new uint8 batch."""
    if num_ops == 0:
        return images
    if not 0 <= magnitude < BINS:
        raise ValueError(f"magnitude must be a bin in 0..{BINS - 1}, got {magnitude}")
    ops, negative = rand_augment_draws(seeds.to(images.device), num_ops)
    magnitude_bin = torch.full_like(ops[:, 0], magnitude)
    for i in range(num_ops):
        images = apply_ops(images, "randaugment", ops[:, i], magnitude_bin, negative[:, i])
    return images


def batch_augment(kind: Augment, images: Tensor, seeds: Tensor) -> Tensor:
    """``augment: kind`` (``none``, ``trivialaugment`` or ``randaugment`` with torchvision's defaults) of a uint8
    batch ``[B, C, H, W]``, each image from its seed."""
    if kind == "trivialaugment":
        return trivial_augment(images, seeds)
    if kind == "randaugment":
        return rand_augment(images, seeds)
    if kind == "none":
        return images
    raise ValueError(f"augment must be 'none', 'trivialaugment' or 'randaugment', got {kind!r}")


def trivial_augment_draws(seeds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(op index into OPS, magnitude bin, negative sign)`` per seed, int64/int64/bool on the seeds' device."""
    draws = seed_uniforms(seeds, AUGMENT_STREAM, 3)
    return _uniform_int(draws[:, 0], len(OPS)), _uniform_int(draws[:, 1], BINS), draws[:, 2] < 0.5


def rand_augment_draws(seeds: Tensor, num_ops: int) -> tuple[Tensor, Tensor]:
    """``(op indices [B, num_ops], negative signs [B, num_ops])`` per seed."""
    draws = seed_uniforms(seeds, AUGMENT_STREAM, 2 * num_ops).view(-1, num_ops, 2)
    return _uniform_int(draws[..., 0], len(OPS)), draws[..., 1] < 0.5


def _uniform_int(uniform: Tensor, n: int) -> Tensor:
    return (uniform * n).to(torch.int64).clamp_(max=n - 1)


def apply_ops(images: Tensor, policy: Policy, op: Tensor, magnitude_bin: Tensor, negative: Tensor) -> Tensor:
    """One op per uint8 image ``[B, C, H, W]``: ``OPS[op[i]]`` at magnitude bin ``magnitude_bin[i]`` of ``policy``,
    negated where ``negative[i]`` (signed ops only); returns a new uint8 batch."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [B, C, H, W], got {images.dtype} of shape {tuple(images.shape)}")
    channels, height, width = images.shape[1:]
    if channels not in (1, 3):
        raise DataConfigError(f"augment ({policy}) needs images of 1 or 3 channels, got {channels}; set augment: none")
    tables = _tables(policy, height, width, images.device)
    code = (op * BINS + magnitude_bin) * 2 + negative.to(torch.int64)
    params, theta = tables.params[code], tables.theta[code]  # [B, columns], [B, 2, 3]
    images = images.contiguous()
    gray = _grayscale(images)
    x = _point_ops(images, gray, params).to(torch.float32)
    x = _affine(x, theta, tables)
    if channels == 3:  # torchvision's Color leaves 1-channel images as they are
        x = _blend(x * _per_image(params[:, COLOR_RATIO]), gray, _per_image(params[:, COLOR_ALPHA]))
        x = x.clamp_(0, 255)  # not truncated yet: the next steps leave this image as it is
    x = _sharpness(x, _per_image(params[:, SHARP_ALPHA]))
    return x.to(torch.uint8)  # truncates, as torchvision's conversions do


class _Tables(NamedTuple):
    """The parameters of every (op, magnitude bin, sign) of a policy for one image size, on one device."""

    params: Tensor  # [codes, 6] float32, columns KIND..SHARP_ALPHA; identity values where an op has no such step
    theta: Tensor  # [codes, 2, 3] float32: output -> input pixel coordinates, origin at the image centre
    base_grid: Tensor  # [1, H * W, 3]: (x, y, 1) of the output pixel centres
    half_size: Tensor  # [W / 2, H / 2]


@functools.lru_cache(maxsize=32)
def _tables(policy: Policy, height: int, width: int, device: torch.device) -> _Tables:
    """Built once per policy, size and device: a per-batch copy to a GPU would make the host wait for it."""
    params, thetas = [], []
    for op in OPS:
        values = magnitudes(policy, op, height, width)
        for magnitude_bin in range(BINS):
            for negative in (False, True):
                magnitude = 0.0 if values is None else values[magnitude_bin]
                if negative and op in SIGNED:
                    magnitude = -magnitude
                params.append(_op_params(op, magnitude))
                thetas.append(_op_theta(op, magnitude, height, width))
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height)
    ones = torch.ones(height, width)
    base_grid = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), ones], dim=-1)
    cpu = _Tables(
        torch.tensor(params, dtype=torch.float32),
        torch.tensor(thetas, dtype=torch.float32).view(-1, 2, 3),
        base_grid.view(1, height * width, 3),
        torch.tensor([0.5 * width, 0.5 * height]),
    )
    return _Tables(*(t.to(device) for t in cpu))


def _op_params(op: str, magnitude: float) -> list[float]:
    """The table row of one op: its point table and factors, with torchvision's float64 arithmetic (``1.0 +
    magnitude``, ``255 * magnitude``...) before the rounding to float32 that torch applies to such scalars."""
    kind, a, b, color_ratio, color_alpha, sharp_alpha = 0.0, 1.0, 0.0, 1.0, 0.0, 0.0
    if op in POINT_OPS:
        kind = float(POINT_OPS.index(op))
    if op == "Brightness":
        a = 1.0 + magnitude
    elif op == "Contrast":
        a = 1.0 + magnitude
        b = 1.0 - a
    elif op == "Color":
        color_ratio = 1.0 + magnitude
        color_alpha = 1.0 - color_ratio
    elif op == "Sharpness":
        sharp_alpha = 1.0 - (1.0 + magnitude)
    elif op == "Posterize":
        bits = int(magnitude)
        a = float(((1 << bits) - 1) << (8 - bits))  # the bits kept: 255 for 8, no change
    elif op == "Solarize":
        a = 255.0 * magnitude
    return [kind, a, b, color_ratio, color_alpha, sharp_alpha]


def _op_theta(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix of a geometric op with torchvision's parameters (the identity for other ops):
    shears about the top-left corner by ``atan(magnitude)``, translations by ``int(magnitude)`` pixels, rotations
    about the centre, counter-clockwise."""
    corner = (-0.5 * width, -0.5 * height)
    if op == "ShearX":
        return _inverse_affine(0.0, (0.0, 0.0), (math.degrees(math.atan(magnitude)), 0.0), corner)
    if op == "ShearY":
        return _inverse_affine(0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(magnitude))), corner)
    if op == "TranslateX":
        return _inverse_affine(0.0, (float(int(magnitude)), 0.0), (0.0, 0.0), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_affine(0.0, (0.0, float(int(magnitude))), (0.0, 0.0), (0.0, 0.0))
    if op == "Rotate":  # F.rotate's angle in [0, 360), passed to the affine matrix negated
        return _inverse_affine(-(magnitude % 360), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _inverse_affine(
    angle: float, translate: tuple[float, float], shear: tuple[float, float], center: tuple[float, float]
) -> list[float]:
    """``[a, b, c, d, e, f]``: output pixel (x, y) samples input (ax + by + c, dx + ey + f), coordinates relative to
    the image centre, for the map translate . (about ``center``: rotate(angle) . shear_y . shear_x), degrees.

    The forward rotation-shear is [[p, q], [r, s]] with determinant 1, so its inverse is [[s, -q], [-r, p]].
    """
    rot, shear_x, shear_y = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    moved_x, moved_y = cx + translate[0], cy + translate[1]
    p = math.cos(rot - shear_y) / math.cos(shear_y)
    q = -(p * math.tan(shear_x) + math.sin(rot))
    r = math.sin(rot - shear_y) / math.cos(shear_y)
    s = math.cos(rot) - r * math.tan(shear_x)
    matrix = [s, -q, 0.0, -r, p, 0.0]
    matrix[2] += cx - matrix[0] * moved_x - matrix[1] * moved_y
    matrix[5] += cy - matrix[3] * moved_x - matrix[4] * moved_y
    return matrix


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(base: Tensor, other: Tensor, alpha: Tensor) -> Tensor:
    """``base + other * alpha`` (float32, ``alpha`` per image) rounded as torchvision's blends compute it with
    ``base.add_(other, alpha=...)``: ``addcmul`` rounds as ``add`` does on each CPU kernel (one rounding where the
    kernel fuses the multiply-add, two where it does not), which the op-by-op tests check."""
    return torch.addcmul(base, other, alpha)


def _grayscale(images: Tensor) -> Tensor:
    """torchvision's grey image of Color and Contrast, ``[B, 1, H, W]`` float32: floor(0.2989 R + 0.587 G + 0.114 B)
    (the channel itself for 1-channel images)."""
    if images.shape[1] == 1:
        return images.to(torch.float32)
    r, g, b = images.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _point_ops(images: Tensor, gray: Tensor, params: Tensor) -> Tensor:
    """Identity, Brightness, Contrast, Posterize, Solarize, AutoContrast or Equalize per image, as a table of 256
    values per image and channel ``[B, C, 256]`` gathered at the pixel values."""
    batch, channels = images.shape[:2]
    levels = torch.arange(256, device=images.device)
    values = levels.to(torch.float32)
    a, b = params[:, POINT_A, None, None], params[:, POINT_B, None, None]  # [B, 1, 1]
    brightness = values * a
    mean = gray.mean(dim=(1, 2, 3)).view(-1, 1, 1)
    contrast = _blend(values * a, mean, b)
    posterize = levels.to(torch.uint8) & a.to(torch.uint8)
    solarize = torch.where(values >= a, 255 - levels, levels)
    flat = images.view(batch, channels, -1)
    tables = [levels.expand(batch, 1, 256), brightness, contrast, posterize, solarize, *_channel_tables(flat, values)]
    tables = [t.clamp(0, 255).to(torch.uint8).expand(batch, channels, 256) for t in tables]
    kind = params[:, KIND].to(torch.int64).view(-1, 1, 1, 1).expand(batch, 1, channels, 256)
    table = torch.stack(tables, dim=1).gather(1, kind).squeeze(1)  # [B, C, 256]
    return table.gather(2, flat.to(torch.int64)).view_as(images)


def _channel_tables(flat: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The AutoContrast and Equalize tables of each image channel ``[B, C, HW]``, ``[B, C, 256]`` each."""
    low, high = flat.amin(dim=2, keepdim=True).to(torch.float32), flat.amax(dim=2, keepdim=True)
    # AutoContrast: the channel's range stretched to 0..255; a constant channel stays as it is.
    flat_channel = high.to(torch.float32) == low
    scale = torch.where(flat_channel, 1.0, (high - low) * (1.0 / 255))
    autocontrast = (values - torch.where(flat_channel, 0.0, low)) / scale
    # Equalize, PIL's way: cumulative histogram over `step`, the pixels below the channel's top value / 255.
    indices = flat.to(torch.int64)
    histogram = torch.zeros(*flat.shape[:2], 256, dtype=torch.int32, device=flat.device)
    histogram.scatter_add_(2, indices, torch.ones_like(indices, dtype=torch.int32))
    step = (flat.shape[2] - histogram.gather(2, high.to(torch.int64))).div_(255, rounding_mode="floor")
    cumulative = histogram.cumsum(2, dtype=torch.int32)[..., :-1]
    equalized = (cumulative + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    equalized = torch.cat([torch.zeros_like(equalized[..., :1]), equalized], dim=2)
    equalize = torch.where(step != 0, equalized, values.to(torch.int32))  # too few pixels below the top: unchanged
    return autocontrast, equalize


def _affine(x: Tensor, theta: Tensor, tables: _Tables) -> Tensor:
    """Each image of float ``x`` resampled through its inverse affine matrix: nearest pixel, 0 outside (one
    ``grid_sample`` for the batch, on torchvision's grid: pixel centres relative to the image centre).

    The grid is ``x * a + y * b + c`` in separate float32 steps, which rounds as the CPU matrix product of
    torchvision does (bit for bit, tested), and never as TF32 on a GPU that allows it for matrix products.
    """
    height, width = x.shape[2:]
    scaled = (theta.transpose(1, 2) / tables.half_size)[:, None, None]  # [B, 1, 1, 3, 2]: to [-1, 1] coordinates
    base = tables.base_grid.view(1, height, width, 3, 1)
    grid = base[..., 0, :] * scaled[..., 0, :] + base[..., 1, :] * scaled[..., 1, :] + scaled[..., 2, :]
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _sharpness(x: Tensor, alpha: Tensor) -> Tensor:
    """torchvision's Sharpness of float pixel values ``x``: the inner pixels blended with their 3x3 smoothing (weight
    5 at the centre, 1 around, rounded), border pixels kept; ``alpha`` = 1 - factor, 0 for no change.

    The sums run over each image's pixels as one flat row (neighbours at offsets 1 and ``W``): contiguous slices,
    fast on every device; the border columns, where the row wraps, are masked out.
    """
    batch, channels, height, width = x.shape
    if height <= 2 or width <= 2:
        return x
    flat = x.reshape(batch, channels, height * width)
    inner = height * width - 2 * width - 2  # flat positions width + 1 ... : the pixels off the top and bottom rows
    rows = flat[..., :-2] + flat[..., 1:-1] + flat[..., 2:]
    centre = flat[..., width + 1 : width + 1 + inner]
    sums = rows[..., :inner] + rows[..., width : width + inner] + rows[..., 2 * width : 2 * width + inner] + 4 * centre
    # Whole numbers for the images this changes (Color's may not be whole yet, but their alpha is 0): exact, and
    # never a tie when divided by 13 (a multiple of 1/13 is at least 1/26 from one).
    column = torch.arange(width + 1, width + 1 + inner, device=x.device) % width
    off_border = (column != 0) & (column != width - 1)
    change = torch.where(off_border, torch.round(sums / 13) - centre, 0.0)
    change = F.pad(change, (width + 1, width + 1))
    return _blend(flat, change, alpha.view(-1, 1, 1)).clamp_(0, 255).view_as(x)
