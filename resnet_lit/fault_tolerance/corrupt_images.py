"""`CorruptImageReport`: log and summarise the corrupt images that `skip_corrupt: true` replaced."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from resnet_lit.fault_tolerance.distributed import gather_objects


class CorruptImageReport(Callback):
    """Logs ``data/corrupt_skipped`` (replaced reads of corrupt images, all splits, ranks and workers, since
    the run began, resumes included) at every training epoch end, and prints a summary at the end.

    Reads the DataModule's ``corrupt_skipped`` counter (resnet-lit DataModules); does nothing for others.
    The files themselves are named in the data layer's warnings when they are first replaced.
    """

    def __init__(self) -> None:
        self._offset = 0  # replaced before the checkpoint this run resumed from, this rank

    @staticmethod
    def _local(trainer: pl.Trainer) -> int | None:
        count = getattr(trainer.datamodule, "corrupt_skipped", None)
        return None if count is None else int(count)

    def _total(self, trainer: pl.Trainer) -> int | None:
        local = self._local(trainer)
        if local is None:
            return None
        value = torch.tensor(local + self._offset, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(value, reduce_op="sum").item()) if trainer.world_size > 1 else int(value)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = self._total(trainer)
        if total is not None:
            pl_module.log("data/corrupt_skipped", float(total), on_step=False, on_epoch=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = self._total(trainer)
        if total:
            rank_zero_warn(
                f"resnet-lit: {total} read(s) of corrupt images were replaced by the next decodable sample "
                "(skip_corrupt: true); the files are named in the warnings above. Logged as data/corrupt_skipped"
            )
        elif total == 0 and getattr(trainer.datamodule, "skip_corrupt", False):
            rank_zero_info("resnet-lit: no corrupt images were found")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        local = self._local(trainer)
        counts = gather_objects(trainer, (local or 0) + self._offset)
        checkpoint["resnet_lit_corrupt_skipped"] = {"world_size": trainer.world_size, "ranks": counts}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("resnet_lit_corrupt_skipped")
        if saved is None:
            return
        if saved["world_size"] == trainer.world_size:
            self._offset = int(saved["ranks"][trainer.global_rank])
        elif trainer.is_global_zero:  # keep the total, on rank 0
            self._offset = int(sum(saved["ranks"]))
