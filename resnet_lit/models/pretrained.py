"""Named pretrained sources for `model.init_from`: `torchvision:<arch>.<WEIGHTS>` resolved to torch hub's cache.

The name goes through torchvision's weight enums (`torchvision.models.get_model_weights(arch)[WEIGHTS]`) to the
URL, whose file lives in `$TORCH_HOME/hub/checkpoints/` as torchvision itself would store it. An absent file is
downloaded where the network allows; otherwise one line names the URL and the cache path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch

from resnet_lit.errors import ResNetLitError

TORCHVISION_PREFIX = "torchvision:"


class PretrainedSourceError(ResNetLitError, ValueError):
    """A named pretrained source is unknown, or its file is neither cached nor downloadable."""


@dataclass(frozen=True)
class PretrainedSource:
    """Where a named source's weights are and the preprocessing they were trained with."""

    name: str
    path: str
    url: str
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def describe_preprocessing(self) -> str:
        """One line, e.g. `resize 232 (bilinear), centre crop 224, mean [...], std [...]`."""
        p = self.preprocessing
        return (
            f"resize {p['resize_size']} ({p['interpolation']}), centre crop {p['crop_size']}, "
            f"mean {p['mean']}, std {p['std']}"
        )


def is_named_source(value: str) -> bool:
    """Whether `model.init_from` names a library's weights rather than a file."""
    return value.startswith(TORCHVISION_PREFIX)


def resolve_named_source(value: str, download: bool = True) -> PretrainedSource:
    """Resolve `torchvision:<arch>.<WEIGHTS>` to its cached file, downloading it if absent and ``download``."""
    weights = _torchvision_weights(value)
    url = weights.url
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        if not download:
            raise PretrainedSourceError(f"model.init_from: {value} is not cached at {path}; download {url} there")
        try:
            torch.hub.load_state_dict_from_url(url, model_dir=folder, map_location="cpu", check_hash=True)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [""])[0]
            raise PretrainedSourceError(
                f"model.init_from: cannot download {value} from {url} ({type(err).__name__}: {reason}); "
                f"download it on a machine with network access and copy it to {path}"
            ) from err
    return PretrainedSource(value, path, url, _preprocessing(weights))


def _torchvision_weights(value: str) -> Any:
    from torchvision.models import get_model_weights, list_models

    spec = value[len(TORCHVISION_PREFIX) :]
    arch, _, member = spec.rpartition(".")
    if not arch or not member:
        raise PretrainedSourceError(
            f"model.init_from: {value!r} must read torchvision:<arch>.<WEIGHTS>, "
            "e.g. torchvision:resnet50.IMAGENET1K_V2"
        )
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        known = ", ".join(m for m in list_models() if "res" in m)
        raise PretrainedSourceError(
            f"model.init_from: torchvision has no model {arch!r} in {value!r}; known: {known}"
        ) from None
    try:
        return enum[member]
    except KeyError:
        names = ", ".join(list(enum.__members__))
        raise PretrainedSourceError(
            f"model.init_from: torchvision has no weights {member!r} for {arch} in {value!r}; choose from {names}"
        ) from None


def _preprocessing(weights: Any) -> dict[str, Any]:
    transforms = weights.transforms()
    interpolation = getattr(transforms, "interpolation", None)
    return {
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "resize_size": _single(transforms.resize_size),
        "crop_size": _single(transforms.crop_size),
        "interpolation": getattr(interpolation, "value", str(interpolation)),
    }


def _single(size: Any) -> Any:
    return size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
