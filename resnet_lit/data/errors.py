"""Exceptions raised by the data layer, with messages that say what to fix, and the argument checks that raise them."""

from __future__ import annotations

from resnet_lit.errors import ResNetLitError


class DataConfigError(ResNetLitError, ValueError):
    """The dataset on disk or the DataModule arguments are unusable (missing folder, empty class, ...)."""


class CorruptImageError(ResNetLitError, RuntimeError):
    """An image file could not be decoded. The message names the file.

    Takes a single message argument so that DataLoader workers can re-raise it in the main process.
    """


def require_positive(**values: int | None) -> None:
    """Raise a DataConfigError naming the first argument (``key=value``) that is set and not a positive integer."""
    for key, value in values.items():
        if value is not None and value <= 0:
            raise DataConfigError(f"{key} must be a positive integer, got {value!r}")
