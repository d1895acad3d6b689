"""Deployment-side preprocessing of an exported model's input, with PIL and numpy only.

It follows the ``preprocessing`` metadata that `resnet-lit export` stores with the model, and reproduces the eval
pipeline of training (:meth:`resnet_lit.data.transforms.ImagePipeline.eval`): the same colour conversion as the
training loader, torchvision's output size for a shorter-side resize, bilinear antialiased resampling (PIL's; it
differs from torch's by a rounding step on some pixels) and torchvision's ``CenterCrop`` offsets and zero padding,
exactly. Like training it ignores EXIF orientation. Normalisation is inside the exported model, so the result is just
float32 in [0, 1].

This file imports nothing from resnet-lit or torch: copy it into a serving image to preprocess without them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageInput = str | os.PathLike | Image.Image


def preprocess_image(image: ImageInput, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Float32 ``[C, H, W]`` in [0, 1]: ``image`` (a file or a PIL image) converted, resized and center-cropped as
    the ``preprocessing`` metadata says."""
    color = preprocessing.get("color", "RGB")
    if color not in ("RGB", "L"):
        raise ValueError(f"preprocessing.color must be 'RGB' or 'L', got {color!r}")
    interpolation = preprocessing.get("interpolation", "bilinear")
    if interpolation != "bilinear" or preprocessing.get("antialias", True) is not True:
        raise ValueError(
            "only bilinear antialiased resizing is supported, got preprocessing.interpolation "
            f"{interpolation!r} with antialias {preprocessing.get('antialias')!r}"
        )
    if isinstance(image, Image.Image):
        picture = image.convert(color)  # a copy even when the mode already matches
    else:
        with Image.open(image) as opened:
            picture = opened.convert(color)  # convert() decodes fully, as the training loader does
    picture = _resize(picture, preprocessing.get("resize"), preprocessing.get("resize_mode"))
    pixels = np.asarray(picture, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    crop = preprocessing.get("center_crop")
    if crop is not None:
        pixels = center_crop(pixels, _pair("preprocessing.center_crop", crop))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def preprocess_batch(images: Iterable[ImageInput], preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Float32 ``[N, C, H, W]``: :func:`preprocess_image` of each image, stacked."""
    arrays = [preprocess_image(image, preprocessing) for image in images]
    if not arrays:
        raise ValueError("preprocess_batch needs at least one image")
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"the preprocessed images differ in shape ({sorted(shapes)}); the metadata has no crop")
    return np.stack(arrays)


def read_onnx_metadata(session_or_path: Any) -> dict[str, Any]:
    """Every ``metadata_props`` entry of an ONNX model, decoded from JSON (a value that is not JSON stays a string).

    Accepts an ``onnxruntime.InferenceSession`` or the path of the ``.onnx`` file.
    """
    session = session_or_path
    if not hasattr(session, "get_modelmeta"):
        import onnxruntime

        session = onnxruntime.InferenceSession(os.fspath(session_or_path), providers=["CPUExecutionProvider"])
    metadata: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


def resized_size(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """``(height, width)`` after torchvision's ``Resize(shorter_side)``: the long side is truncated, not rounded."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shorter_side * long / short)
    return (new_long, shorter_side) if width <= height else (shorter_side, new_long)


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ``[H, W, C]`` center crop of torchvision's ``CenterCrop(size)``: zero padding first if the image is smaller
    (the odd pixel on the right/bottom), offsets ``round((image - crop) / 2)`` with Python's round-half-to-even."""
    crop_height, crop_width = size
    height, width = pixels.shape[:2]
    if crop_height > height or crop_width > width:
        pad_top = (crop_height - height) // 2 if crop_height > height else 0
        pad_left = (crop_width - width) // 2 if crop_width > width else 0
        pad_bottom = (crop_height - height + 1) // 2 if crop_height > height else 0
        pad_right = (crop_width - width + 1) // 2 if crop_width > width else 0
        pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        height, width = pixels.shape[:2]
    top = round((height - crop_height) / 2.0)  # Python's round: half to even, as torchvision
    left = round((width - crop_width) / 2.0)
    return pixels[top : top + crop_height, left : left + crop_width]


def _resize(picture: Image.Image, resize: Any, mode: str | None) -> Image.Image:
    if resize is None:
        return picture
    if mode == "exact" or (mode is None and not isinstance(resize, int)):
        height, width = _pair("preprocessing.resize", resize)
    elif mode in ("shorter_side", None) and isinstance(resize, int) and resize > 0:
        height, width = resized_size(picture.height, picture.width, resize)
    else:
        raise ValueError(
            f"preprocessing.resize {resize!r} with resize_mode {mode!r}: expected an int with 'shorter_side' or "
            "[height, width] with 'exact'"
        )
    if (width, height) == picture.size:  # torchvision leaves such an image untouched too
        return picture
    return picture.resize((width, height), Image.Resampling.BILINEAR)


def _pair(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{key} must be an int or [height, width], got {value!r}")
