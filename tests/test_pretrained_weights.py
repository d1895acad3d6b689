"""`model.init_from` with torchvision and timm weights: key translation gives the source library's outputs,
`.safetensors` files, and named `torchvision:` sources resolved from torch hub's cache without a network."""

from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from offline_hub import offline_torch_home
from resnet_lit import ResNetClassifier
from resnet_lit.fault_tolerance.checkpoint_files import CheckpointReadError
from resnet_lit.fault_tolerance.checkpoint_io import CheckpointMismatchError, load_network_weights
from resnet_lit.models.pretrained import PretrainedSourceError

timm = pytest.importorskip("timm")


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random affine BatchNorm parameters and running statistics, so that a wrong
    mapping of any BN tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                ranges = {"weight": (0.5, 1.0), "bias": (-0.2, 0.2), "running_mean": (-0.2, 0.2),
                          "running_var": (0.5, 2.0)}  # fmt: skip
                for name, (low, high) in ranges.items():
                    tensor = getattr(module, name)
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def assert_same_outputs(source: nn.Module, arch: str, path: Path, size: int = 64) -> None:
    model = ResNetClassifier(arch=arch, num_classes=1000, init_from=str(path)).eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = source(images), model(images)
    assert expected.abs().max() > 1e-2  # a meaningful comparison, not two vectors of zeros
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_torchvision_resnet50_pth_gives_torchvision_outputs(tmp_path: Path) -> None:
    source = randomised(torchvision.models.resnet50())
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    assert_same_outputs(source, "resnet50", path)


def test_timm_resnet50d_safetensors_gives_timm_outputs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = randomised(timm.create_model("resnet50d", pretrained=False), seed=2)
    path = tmp_path / "resnet50d.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert_same_outputs(source, "resnet50d", path)


def test_timm_seresnet50_pth_gives_timm_outputs(tmp_path: Path) -> None:
    source = randomised(timm.create_model("seresnet50", pretrained=False), seed=3)
    path = tmp_path / "seresnet50.pth"
    torch.save(source.state_dict(), path)
    assert_same_outputs(source, "seresnet50", path)


def test_torchvision_weights_reinit_head_and_mismatch_listing(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    net = ResNetClassifier(arch="resnet18", num_classes=10).net
    with pytest.raises(CheckpointMismatchError, match=r"head\.fc\.weight: \[1000, 512\] -> \[10, 512\]"):
        load_network_weights(net, str(path), reinit_head=False)
    report = load_network_weights(net, str(path), reinit_head=True)
    assert "re-initialised the classification head" in report
    with pytest.raises(CheckpointMismatchError, match=r"stages\.0\.2\.conv1\.weight"):  # resnet34 has 3 blocks
        load_network_weights(ResNetClassifier(arch="resnet34", num_classes=1000).net, str(path), reinit_head=False)


def test_named_torchvision_source_resolves_from_torch_hub_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = offline_torch_home(monkeypatch, tmp_path)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache.mkdir(parents=True)
    source = randomised(torchvision.models.resnet18(), seed=4)
    torch.save(source.state_dict(), cache / os.path.basename(weights.url))
    net = ResNetClassifier(arch="resnet18", num_classes=1000).net.eval()
    report = load_network_weights(net, "torchvision:resnet18.IMAGENET1K_V1", reinit_head=False)
    assert str(cache / os.path.basename(weights.url)) in report
    assert "resize 256 (bilinear), centre crop 224, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in report
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(images), source(images), rtol=0, atol=1e-5)


def test_named_source_missing_offline_is_one_line_with_url_and_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = offline_torch_home(monkeypatch, tmp_path)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    with pytest.raises(PretrainedSourceError) as info:
        ResNetClassifier(arch="resnet50", num_classes=1000, init_from="torchvision:resnet50.IMAGENET1K_V2")
    message = str(info.value)
    assert "\n" not in message
    assert url in message and str(cache / os.path.basename(url)) in message and "URLError" in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchvision:resnet50.IMAGENET9K", r"no weights 'IMAGENET9K' for resnet50 .*IMAGENET1K_V2"),
        ("torchvision:resnet51.IMAGENET1K_V1", r"no model 'resnet51'"),
        ("torchvision:resnet50", r"must read torchvision:<arch>\.<WEIGHTS>"),
    ],
)
def test_bad_named_source_is_named(name: str, expected: str) -> None:
    net = nn.Linear(1, 1)
    with pytest.raises(PretrainedSourceError, match=expected):
        load_network_weights(net, name, reinit_head=False)


def test_safetensors_without_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 16)
    real_import = builtins.__import__

    def no_safetensors(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "safetensors.torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(CheckpointReadError, match=r"pip install resnet-lit\[weights\]") as info:
        load_network_weights(nn.Linear(1, 1), str(path), reinit_head=False)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_network_with_torchvision_names_loads_the_file_untranslated(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    source = randomised(torchvision.models.resnet18(num_classes=10))
    torch.save(source.state_dict(), path)
    net = torchvision.models.resnet18(num_classes=10).eval()  # e.g. a `net:` plugin that wraps torchvision's
    load_network_weights(net, str(path), reinit_head=False)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(images), source(images), rtol=0, atol=0)
