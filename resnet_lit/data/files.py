"""Finding image files and class folders on disk: symlinks are followed, but each real folder is listed once and a
link back to a folder that contains it (a loop, e.g. ``train/cat/loop -> ..``) is left out with a warning."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def contains(folder: str, path: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies inside it (both already resolved)."""
    return os.path.commonpath([folder, path]) == folder


def warn_loop(link: str, target: str) -> None:
    """Name a symlink that leads back to a folder containing it, which is not followed."""
    warnings.warn(
        f"symlink loop: {link!r} points to {target!r}, which contains it; not followed (remove the link)",
        stacklevel=3,
    )


def find_images(directory: str | Path) -> list[str]:
    """All image files under ``directory`` (recursive, following symlinks, sorted, by extension).

    Every real folder is visited once: a symlink to a folder that contains it (a loop) or to a folder already
    listed is not followed, so no image is listed twice or under a folder it does not belong to.
    """
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        here = os.path.realpath(dirpath)
        visited.add(here)
        kept = []
        for name in sorted(dirnames):  # sorted: which of two links to one folder is listed does not vary
            path = os.path.join(dirpath, name)
            target = os.path.realpath(path)
            if contains(target, here):
                warn_loop(path, target)
            elif target in visited:
                warnings.warn(f"{path!r} leads to {target!r}, which is listed already; not listed twice", stacklevel=2)
            else:
                visited.add(target)
                kept.append(name)
        dirnames[:] = kept
        found.extend(os.path.join(dirpath, name) for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def scan_classes(split_dir: str) -> list[str]:
    """Sorted class sub-folder names of ``split_dir`` (one listdir); a link to ``split_dir`` or above is a loop."""
    here = os.path.realpath(split_dir)
    names = []
    for entry in os.scandir(split_dir):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        target = os.path.realpath(entry.path)
        if contains(target, here):
            warn_loop(entry.path, target)
        else:
            names.append(entry.name)
    return sorted(names)
