"""Test-time augmentation (`model.tta`) of validation, test and predict: the logits of each image averaged with
those of its mirror image. Training never uses it, and an export leaves it out (the exported network is the
plain one, so a deployment can choose)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

TestTimeAugmentation = Literal["none", "flip"]


def augmented_logits(network: nn.Module, images: Tensor, tta: TestTimeAugmentation) -> Tensor:
    """`network(images)`, or with "flip" the mean of the logits of the images and of their horizontal mirrors
    (one batch of twice the size would need twice the memory; two passes keep the eval batch size's)."""
    logits = network(images)
    if tta == "flip":
        logits = (logits + network(images.flip(-1))) / 2
    return logits
