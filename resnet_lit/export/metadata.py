"""What travels with an exported model: the architecture, the class names, the input it takes and the preprocessing a
deployer must apply before it (ONNX ``metadata_props``, the ``.pt2``'s extra file, safetensors metadata, and the JSON
file beside the artefact)."""

from __future__ import annotations

from typing import Any

import torch

import resnet_lit
from resnet_lit.data.normalize import per_channel
from resnet_lit.data.transforms import ImagePipeline

SCHEMA = "resnet_lit.export/1"


def preprocessing_spec(
    pipeline: ImagePipeline,
    image_size: int,
    in_channels: int,
    normalization_in_model: bool = True,
) -> dict[str, Any]:
    """The deterministic eval preprocessing of ``pipeline``, for inputs of ``image_size`` pixels.

    Mirrors :meth:`ImagePipeline.eval`: ``imagenet``/``cifar`` resize the shorter side and center-crop, ``plain``
    resizes to a square: to the crop size, or without one to the size the network was evaluated at (a no-op for
    images of the data's own size, and the right input size for any other). An
    ``image_size`` other than the data's crop scales the resize by the same ratio, keeping the crop fraction (timm's
    ``crop_pct``). ``normalization_in_model`` is false for bare network weights (safetensors): the deployer then
    normalises with the recorded mean and std.
    """
    crop = pipeline.crop_size
    resize: int | list[int] | None
    if pipeline.style == "plain":
        resize, mode, center_crop = [image_size, image_size], "exact", None
    else:
        base_resize = pipeline.resize_size or crop or image_size
        scale = image_size / crop if crop else 1.0
        resize, mode, center_crop = round(base_resize * scale), "shorter_side", image_size
    mean = per_channel("mean", tuple(pipeline.mean), in_channels)
    std = per_channel("std", tuple(pipeline.std), in_channels)
    return {
        "color": "L" if in_channels == 1 else "RGB",
        "resize": resize,
        "resize_mode": mode,
        "center_crop": center_crop,
        "interpolation": "bilinear",
        "antialias": True,
        "scale": "divide 8-bit pixel values by 255 (float32 in [0, 1])",
        "mean": list(mean),
        "std": list(std),
        "normalization_in_model": normalization_in_model,
        "normalization": "inside the model: do not subtract mean or divide by std yourself"
        if normalization_in_model
        else "yours: (x - mean) / std per channel before the network",
    }


def input_spec(image_size: int, in_channels: int, dynamic_batch: bool, batch_size: int) -> dict[str, Any]:
    """The tensor the exported model takes."""
    return {
        "name": "images",
        "dtype": "float32",
        "layout": "NCHW",
        "range": [0.0, 1.0],
        "channels": in_channels,
        "height": image_size,
        "width": image_size,
        "batch": "dynamic" if dynamic_batch else batch_size,
    }


def export_metadata(
    *,
    export_format: str,
    hparams: Any,
    class_names: list[str],
    preprocessing: dict[str, Any],
    inputs: dict[str, Any],
    checkpoint: str | None,
    ema: bool,
) -> dict[str, Any]:
    """The metadata dictionary stored with the artefact (JSON-compatible)."""
    return {
        "schema": SCHEMA,
        "format": export_format,
        "arch": hparams["arch"],
        "net": dict(hparams.get("net") or {}),
        "num_classes": int(hparams["num_classes"]),
        "in_channels": int(hparams["in_channels"]),
        "class_names": list(class_names),
        "input": inputs,
        "output": {"name": "logits", "shape": ["batch", int(hparams["num_classes"])], "softmax": False},
        "preprocessing": preprocessing,
        "source": {"checkpoint": checkpoint, "weights": "ema average" if ema else "network"},
        "resnet_lit_version": resnet_lit.__version__,
        "torch_version": torch.__version__,
    }
