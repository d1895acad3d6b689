"""Errors of a network configuration that the user can fix in the config (`model.net`)."""

from __future__ import annotations

from resnet_lit.errors import ResNetLitError


class ModelConfigError(ResNetLitError, ValueError):
    """A network setting that cannot be built, e.g. a block option the block does not take."""
