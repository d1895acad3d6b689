"""`model.tta: flip` averages the logits of each image and its mirror in validation, test and predict (never in
training); a named pretrained source whose normalisation differs from the data's gets a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fakedata import write_image_folder
from offline_hub import cache_torchvision_weights, offline_torch_home
from resnet_lit import ResNetClassifier
from resnet_lit.training_cli import ResNetLitCLI


def images_and_targets() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 16, 16, generator=generator), torch.arange(6) % 3


@pytest.mark.parametrize("stage", ["val", "test"])
def test_flip_tta_evaluates_the_mean_logits_of_each_image_and_its_mirror(stage: str) -> None:
    torch.manual_seed(0)
    module = ResNetClassifier(arch="resnet20", num_classes=3, tta="flip", channels_last=False).eval()
    images, targets = images_and_targets()
    with torch.no_grad():
        expected = (module.net(images) + module.net(images.flip(-1))) / 2
        assert not torch.allclose(expected, module.net(images), atol=1e-4)  # the mirror changes the logits
        step = module.validation_step if stage == "val" else module.test_step
        step((images, targets), 0)
    metrics = (module.val_metrics if stage == "val" else module.test_metrics).compute()
    assert float(metrics[f"{stage}/loss"]) == pytest.approx(float(F.cross_entropy(expected, targets)), rel=1e-6)
    assert float(metrics[f"{stage}/acc"]) == pytest.approx(float((expected.argmax(1) == targets).float().mean()))


def test_flip_tta_in_predict_and_not_in_training() -> None:
    torch.manual_seed(0)
    module = ResNetClassifier(arch="resnet20", num_classes=3, tta="flip", channels_last=False).eval()
    images, targets = images_and_targets()
    with torch.no_grad():
        expected = ((module.net(images) + module.net(images.flip(-1))) / 2).softmax(1)
        predicted = module.predict_step((images, list(range(6))), 0)
        torch.testing.assert_close(predicted["probs"][:, 0], expected.max(1).values, rtol=0, atol=1e-6)
        assert predicted["classes"][:, 0].tolist() == expected.argmax(1).tolist()
        module.train()
        loss = module.training_step((images, targets), 0)
    assert float(loss) == pytest.approx(float(F.cross_entropy(module.net(images), targets)), rel=1e-5)


def test_fit_time_validation_uses_tta(tmp_path: Path) -> None:
    """The same weights validated with and without `tta: flip` in a real fit give the values of their logits."""
    args = [
        "validate", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--data", "resnet_lit.data.SyntheticDataModule", "--data.num_samples", "16", "--data.num_val_samples", "12",
        "--data.image_size", "16", "--data.num_classes", "3", "--model.arch", "resnet20", "--seed_everything", "3",
        "--data.loader", "dataloader",
    ]  # fmt: skip
    plain = ResNetLitCLI(args=args)
    flipped = ResNetLitCLI(args=[*args, "--model.tta", "flip"])
    plain_loss, flipped_loss = (float(c.trainer.callback_metrics["val/loss"]) for c in (plain, flipped))
    images = torch.cat([x for x, _ in plain.datamodule.val_dataloader()])
    targets = torch.cat([y for _, y in plain.datamodule.val_dataloader()])
    net = plain.model.net.eval()
    with torch.no_grad():
        assert plain_loss == pytest.approx(float(F.cross_entropy(net(images), targets)), rel=1e-5)
        mean_logits = (net(images) + net(images.flip(-1))) / 2
        assert flipped_loss == pytest.approx(float(F.cross_entropy(mean_logits, targets)), rel=1e-5)
    assert flipped_loss != pytest.approx(plain_loss, rel=1e-4)


@pytest.mark.parametrize("mean", ["[0.485, 0.456, 0.406]", "[0.5, 0.5, 0.5]"], ids=["same-mean", "other-mean"])
def test_a_named_source_warns_when_the_data_is_normalised_otherwise(
    mean: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_torchvision_weights(offline_torch_home(monkeypatch, tmp_path), "torchvision:resnet18.IMAGENET1K_V1")
    write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=2, size=32, splits=("train", "val"))
    args = [
        "validate", "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data", "resnet_lit.data.ImageFolderDataModule", "--data.root", str(tmp_path / "images"),
        "--data.image_size", "32", "--data.batch_size", "2", "--model.arch", "resnet18",
        "--model.init_from", "torchvision:resnet18.IMAGENET1K_V1", "--model.reinit_head", "true",
        "--data.mean", mean, "--data.std", "[0.229, 0.224, 0.225]",
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ResNetLitCLI(args=args)
    warned = [str(w.message) for w in record if "was trained with mean" in str(w.message)]
    if mean.startswith("[0.485"):
        assert warned == []
    else:
        assert warned == [
            "resnet-lit: the data is normalised with mean [0.5, 0.5, 0.5], std [0.229, 0.224, 0.225], but "
            "model.init_from torchvision:resnet18.IMAGENET1K_V1 was trained with mean [0.485, 0.456, 0.406], std "
            "[0.229, 0.224, 0.225]: set data.init_args.mean/std to those values unless the difference is intended"
        ]
