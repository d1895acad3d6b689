"""Exceptions raised by the data layer, with messages that say what to fix."""

from __future__ import annotations


class DataConfigError(ValueError):
    """The dataset on disk or the DataModule arguments are unusable (missing folder, empty class, ...)."""


class CorruptImageError(RuntimeError):
    """An image file could not be decoded. The message names the file.

    Takes a single message argument so that DataLoader workers can re-raise it in the main process.
    """
