"""`BatchRecorder`: a linear classifier that records the batch and loss of every training step, for the tests that
compare an interrupted and resumed run with an uninterrupted one batch by batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class BatchRecorder(L.LightningModule):
    """Records ``seen[global_step] = (images, targets)`` and the losses. With ``estimate_steps`` its LR schedule reads
    ``trainer.estimated_stepping_batches``, as resnet-lit's schedules do (that call builds the train loader early)."""

    def __init__(self, num_inputs: int, estimate_steps: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(num_inputs, 10)
        self.estimate_steps = estimate_steps
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen[self.global_step] = (x.clone(), y.clone())
        loss = torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        if not self.estimate_steps:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
