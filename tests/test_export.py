"""`resnet-lit export`: ONNX and torch.export programs that reproduce the checkpoint's logits for every model family,
safetensors that rebuild from their metadata alone, and exports refused when they do not match."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from resnet_lit import ResidualBlock, ResNetClassifier
from resnet_lit.cli import main
from resnet_lit.data import SyntheticDataModule
from resnet_lit.export import deployable as deployable_module
from resnet_lit.export.exporter import export_classifier
from resnet_lit.export.program_file import read_program_metadata
from resnet_lit.export.safetensors_file import read_safetensors_metadata
from resnet_lit.models import BLOCKS, MODELS, NetworkConfig, register_block

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SIDE = 64


class TwoConvUserBlock(ResidualBlock):
    """A user's plugin block: a 3x3 convolution, SiLU, a 1x1 convolution and a norm as the residual branch."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm_layer: Any = nn.BatchNorm2d,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.act1 = nn.SiLU()
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_last = norm_layer(channels)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_last(self.conv2(self.act1(self.conv1(x))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn_last.weight)


@pytest.fixture
def user_block(monkeypatch: pytest.MonkeyPatch) -> str:
    """`export_test_block`, registered for this test only."""
    BLOCKS.names()  # load entry-point plugins before the snapshot
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))
    register_block("export_test_block")(TwoConvUserBlock)
    return "export_test_block"


def trained_like_module(arch: str, net: dict[str, Any] | None = None, num_classes: int = 10) -> ResNetClassifier:
    """A module whose BatchNorm statistics and weights are not the initial ones (as after training)."""
    torch.manual_seed(0)
    names = [f"class_{i}" for i in range(num_classes)]
    module = ResNetClassifier(arch=arch, net=NetworkConfig(**(net or {})), num_classes=num_classes, in_channels=3,
                              class_names=names)  # fmt: skip
    with torch.no_grad():
        module.net.train()
        for _ in range(2):
            module.net(torch.rand(8, 3, SIDE, SIDE) * 2 - 0.5)
        for parameter in module.net.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return module.eval()


def synthetic_data(image_size: int = SIDE, classes: int = 10) -> SyntheticDataModule:
    return SyntheticDataModule(num_classes=classes, image_size=image_size, num_samples=16, num_val_samples=16,
                               num_test_samples=0, batch_size=8)  # fmt: skip


def checkpoint_logits(module: ResNetClassifier, images: torch.Tensor, data: SyntheticDataModule) -> torch.Tensor:
    """The logits the module computes in validation for ``images`` in [0, 1] (the data path's normalisation)."""
    mean = torch.tensor(data.pipeline.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.pipeline.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return module.inference_network().eval()((images - mean) / std)


FAMILIES = [
    ("resnet18", {}),
    ("resnet20", {}),
    ("resnext50_32x4d", {}),
    ("seresnet50", {}),
    ("resnet50d", {}),
    ("resnet18", {"block": "export_test_block", "layers": [1, 1, 1, 1]}),
]


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["onnx", "exported_program"])
@pytest.mark.parametrize(("arch", "net"), FAMILIES, ids=[a if not n else "user_block" for a, n in FAMILIES])
def test_export_matches_checkpoint_for_every_family(
    arch: str, net: dict[str, Any], export_format: str, user_block: str, tmp_path: Path
) -> None:
    module, data = trained_like_module(arch, net), synthetic_data()
    output = tmp_path / f"model.{export_format}"
    result = export_classifier(module, data, export_format=export_format, output=str(output))  # type: ignore[arg-type]
    assert result.parity.passed and result.parity.batch_sizes == (1, 7)
    assert result.parity.source == "7 images of the val split"

    # Independently of the exporter's own check: run the file as a deployer would, at batch sizes 1 and 7.
    images = torch.rand(7, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    expected = checkpoint_logits(module, images, data)
    if export_format == "onnx":
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        outputs = [session.run(None, {"images": batch.numpy()})[0] for batch in (images[:1], images)]
    else:
        program = torch.export.load(str(output)).module()
        with torch.no_grad():
            outputs = [program(batch).numpy() for batch in (images[:1], images)]
    largest = expected.abs().max().item()
    for got, want in zip(outputs, (expected[:1], expected), strict=True):
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= 1e-4 * largest


def test_safetensors_rebuild_from_their_metadata_alone(user_block: str, tmp_path: Path) -> None:
    module, data = trained_like_module("resnet18", {"block": user_block, "layers": [1, 1, 1, 1]}), synthetic_data()
    output = tmp_path / "weights.safetensors"
    result = export_classifier(module, data, export_format="safetensors", output=str(output))
    metadata = read_safetensors_metadata(str(output))
    assert json.loads((tmp_path / "weights.safetensors.json").read_text())["arch"] == "resnet18"
    assert metadata["net"] == {"block": user_block, "layers": [1, 1, 1, 1]}
    assert result.parity.passed

    from safetensors.torch import load_file

    rebuilt = MODELS.get(metadata["arch"])(num_classes=metadata["num_classes"], in_channels=metadata["in_channels"],
                                           **metadata["net"])  # fmt: skip
    rebuilt.load_state_dict(load_file(str(output)), strict=True)  # the zoo layout: no prefix, nothing missing
    images = torch.rand(3, 3, SIDE, SIDE)
    mean = torch.tensor(metadata["preprocessing"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(metadata["preprocessing"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()((images - mean) / std), checkpoint_logits(module, images, data))


def test_metadata_travels_with_each_format(tmp_path: Path) -> None:
    module, data = trained_like_module("resnet20"), synthetic_data(32)
    export_classifier(module, data, export_format="onnx", output=str(tmp_path / "m.onnx"))
    export_classifier(module, data, export_format="exported_program", output=str(tmp_path / "m.pt2"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    props = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    for metadata in (props, read_program_metadata(str(tmp_path / "m.pt2"))):
        assert metadata["class_names"] == [f"class_{i}" for i in range(10)]
        assert metadata["preprocessing"]["mean"] == [0.5] * 3 and metadata["preprocessing"]["std"] == [0.25] * 3
        assert metadata["input"] == {"name": "images", "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0],
                                     "channels": 3, "height": 32, "width": 32, "batch": "dynamic"}  # fmt: skip
        assert metadata["arch"] == "resnet20"
    assert not (tmp_path / "m.onnx.json").exists()  # ONNX holds its metadata itself
    sidecar = json.loads((tmp_path / "m.pt2.json").read_text())
    assert sidecar["parity"]["passed"] and sidecar["format"] == "exported_program"


def test_imagenet_preprocessing_is_recorded_and_image_size_scales_it(tmp_path: Path) -> None:
    module = trained_like_module("resnet20")
    data = SyntheticDataModule(image_size=64, num_samples=8, num_val_samples=0, num_test_samples=0)
    object.__setattr__(data.pipeline, "style", "imagenet")  # as an ImageFolder config: resize 256, crop 224
    object.__setattr__(data.pipeline, "crop_size", 224)
    object.__setattr__(data.pipeline, "resize_size", 256)
    result = export_classifier(module, data, export_format="onnx", output=str(tmp_path / "m.onnx"), image_size=112)
    preprocessing = result.metadata["preprocessing"]
    assert (preprocessing["resize"], preprocessing["resize_mode"], preprocessing["center_crop"]) == (
        128, "shorter_side", 112)  # fmt: skip
    assert result.parity.source.startswith("7 random images")  # no val or test split here


def write_quickstart_config(tmp_path: Path) -> list[str]:
    """CLI arguments of a tiny run (synthetic data, no training needed for export)."""
    return [
        "--model.arch", "resnet20", "--data", "resnet_lit.data.SyntheticDataModule",
        "--data.init_args.image_size", "16", "--data.init_args.num_samples", "16",
        "--data.init_args.num_val_samples", "16", "--data.init_args.num_test_samples", "0",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip


def test_forced_parity_failure_writes_nothing_and_names_the_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def wrong_normalisation(self: Any, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / (2 * self.std))  # an injected mistake: std doubled

    monkeypatch.setattr(deployable_module.DeployableClassifier, "forward", wrong_normalisation)
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *write_quickstart_config(tmp_path), "--output", str(output), *QUIET])
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: parity check failed") and "\n" not in message
    assert "max |difference|" in message and "nothing written to" in message
    assert not output.parent.exists() or os.listdir(output.parent) == []


def test_missing_export_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *write_quickstart_config(tmp_path), "--output", str(tmp_path / "m.onnx"), *QUIET])
    assert exit_info.value.code == (
        "resnet-lit: error: --format onnx needs onnx, onnxscript, onnxruntime (missing: onnxscript); install them "
        "with: pip install 'resnet-lit[export]'"
    )


def test_static_batch_and_opset(tmp_path: Path) -> None:
    output = tmp_path / "static.onnx"
    main(["export", *write_quickstart_config(tmp_path), "--output", str(output), "--dynamic_batch", "false",
          "--batch_size", "3", "--opset", "18", *QUIET])  # fmt: skip
    model = onnx.load(str(output))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 3, 16, 16]
    assert {entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")} == {18}
    assert json.loads({p.key: p.value for p in model.metadata_props}["input"])["batch"] == 3


def test_export_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *write_quickstart_config(tmp_path), "--format", "exported_program", "--opset", "18", *QUIET])
    assert "--opset applies to --format onnx only" in str(exit_info.value.code)
    with pytest.raises(SystemExit):
        main(["export", *write_quickstart_config(tmp_path), "--format", "torchscript", *QUIET])
    assert "torchscript" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *write_quickstart_config(tmp_path), "--ckpt_path", "last", *QUIET])
    assert "no such checkpoint" in str(exit_info.value.code)


def test_ckpt_path_best_is_the_best_checkpoint_that_last_records(tmp_path: Path) -> None:
    from resnet_lit.export.checkpoint import resolve_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    best = str(folder / "epoch003-step40.ckpt")
    state = {"ResumableCheckpoint{'monitor': 'val/acc', 'mode': 'max'}": {"best_model_path": best}}
    torch.save({"state_dict": {}, "callbacks": state}, folder / "last.ckpt")
    assert resolve_checkpoint("best", str(folder)) == best
    assert resolve_checkpoint("last", str(folder)) == str(folder / "last.ckpt")
    assert resolve_checkpoint(None, str(folder)) is None


def test_the_weight_average_is_what_ships(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    module = ResNetClassifier(arch="resnet20", num_classes=10, in_channels=3, ema_decay=0.9).eval()
    with torch.no_grad():
        for parameter in module.ema.net.parameters():
            parameter.add_(0.05)
    result = export_classifier(module, synthetic_data(16), export_format="safetensors", output=str(tmp_path / "w.st"))
    assert result.metadata["source"]["weights"] == "ema average"
    shipped = load_file(str(tmp_path / "w.st"))
    for key, value in module.ema.net.state_dict().items():
        torch.testing.assert_close(shipped[key], value.contiguous(), rtol=0, atol=0)
    assert not torch.equal(shipped["stem.conv.weight"], module.net.state_dict()["stem.conv.weight"].contiguous())
