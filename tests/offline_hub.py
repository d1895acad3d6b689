"""A torch hub cache prepared by a test: `$TORCH_HOME` in a temporary folder, downloads refused, and the file of a
named torchvision source written there with (randomly initialised) weights of the right layout."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision


def offline_torch_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point `$TORCH_HOME` into `tmp_path`, make every download fail, and return the hub's checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def cache_torchvision_weights(cache: Path, name: str, seed: int = 0) -> Path:
    """Write a torchvision model's state dict where `torchvision:<arch>.<WEIGHTS>` (`name`) is looked up."""
    arch, _, member = name.removeprefix("torchvision:").rpartition(".")
    weights = torchvision.models.get_model_weights(arch)[member]
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=len(weights.meta["categories"]))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / os.path.basename(weights.url)
    torch.save(model.state_dict(), path)
    return path
