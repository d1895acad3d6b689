"""`model.class_weights`: a list or "balanced" (from the DataModule's `class_counts()`) weights the training loss;
the validation and test loss stay unweighted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from fakedata import write_image_folder
from resnet_lit import ResNetClassifier
from resnet_lit.cli import main
from resnet_lit.data import ImageFolderDataModule, SyntheticDataModule
from resnet_lit.data.datasets import ImageFileDataset


def batch(num_classes: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(size, 3, 8, 8, generator=generator), torch.arange(size) % num_classes


def test_a_list_weights_the_training_loss_and_not_the_eval_loss() -> None:
    weights = [1.0, 3.0, 0.5, 2.0]
    module = ResNetClassifier(arch="resnet20", num_classes=4, class_weights=weights, channels_last=False)
    images, targets = batch(4)
    loss = module.training_step((images, targets), 0).item()
    logits = module(images).detach()
    assert loss == pytest.approx(F.cross_entropy(logits, targets, weight=torch.tensor(weights)).item(), rel=1e-6)
    assert loss != pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-3)  # the weights matter

    module.eval()
    module.val_metrics.update(module(images), targets)
    unweighted = F.cross_entropy(module(images), targets)
    assert module.val_metrics.compute()["val/loss"] == pytest.approx(unweighted.item(), rel=1e-6)


@pytest.fixture
def imbalanced(tmp_path: Path) -> ImageFolderDataModule:
    """Image folders with 6 cats, 3 dogs and 1 owl; no val split."""
    for name, count in (("cat", 6), ("dog", 3), ("owl", 1)):
        write_image_folder(tmp_path, classes=(name,), per_class=count, size=8)
    return ImageFolderDataModule(str(tmp_path), transform_style="cifar", image_size=8, val_fraction=0.0,
                                 batch_size=4)  # fmt: skip


def test_class_counts_read_the_labels_without_decoding(
    imbalanced: ImageFolderDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFileDataset, "__getitem__", lambda *_: pytest.fail("decoded an image"))
    assert imbalanced.class_names == ["cat", "dog", "owl"]
    assert imbalanced.class_counts() == [6, 3, 1]
    held_out = SyntheticDataModule(num_classes=3, num_samples=40, num_val_samples=0)
    held_out.val_fraction = 0.25  # a Subset of train: counted through its indices
    train = held_out.splits().train
    assert held_out.class_counts() == torch.bincount(torch.tensor([train[i][1] for i in range(len(train))]),
                                                     minlength=3).tolist()  # fmt: skip
    assert sum(held_out.class_counts()) == 30


def test_balanced_weights_come_from_the_training_split_at_fit(imbalanced: ImageFolderDataModule) -> None:
    module = ResNetClassifier(arch="resnet20", num_classes=3, class_weights="balanced", channels_last=False)
    assert module.class_weight is None  # filled in at setup("fit")
    trainer = Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, datamodule=imbalanced)
    expected = torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    assert module.class_weight == pytest.approx(expected)
    assert "class_weight" not in module.state_dict()  # derived from the data, not a checkpoint entry

    images, targets = batch(3)
    loss = module.training_step((images, targets), 0).item()
    assert loss == pytest.approx(F.cross_entropy(module(images).detach(), targets, weight=expected).item(), rel=1e-6)


def test_a_list_of_the_wrong_length_is_one_line_naming_num_classes() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.class_weights", "[1.0, 2.0]", "--data", "SyntheticDataModule",
              "--data.init_args.num_classes", "3", "--trainer.max_steps", "1"])  # fmt: skip
    message = str(exit_info.value.code)
    assert message == "resnet-lit: error: model.class_weights has 2 entries but model.num_classes is 3"
