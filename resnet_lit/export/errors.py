"""The errors of `resnet-lit export`, each one line naming what to change."""

from __future__ import annotations

from resnet_lit.errors import ResNetLitError


class ExportError(ResNetLitError):
    """An export that cannot be made: a missing optional dependency, a bad option, a network that does not trace."""


class ParityError(ExportError):
    """The exported artefact's logits differ from the checkpoint's beyond the tolerance; nothing was written."""
