"""`ResNetClassifier`: the LightningModule that trains any network of the zoo."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from resnet_lit.fault_tolerance.checkpoint_io import (
    CheckpointMismatchError,
    check_checkpoint_fits,
    load_network_weights,
)
from resnet_lit.fault_tolerance.nonfinite import NonFiniteLossGuard, NonFinitePolicy
from resnet_lit.models import NetworkConfig, create_model
from resnet_lit.optim import param_groups, scale_learning_rate


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


class ResNetClassifier(L.LightningModule):
    """Image classification with a zoo network, cross-entropy, optional label smoothing and mixup/cutmix.

    Args:
        arch: architecture name from `resnet-lit models`, or a dotted path to a model factory.
        net: overrides of the architecture (block, layers, stem, shortcut, ...).
        num_classes: classifier outputs; linked from the DataModule by the CLI.
        in_channels: input channels; linked from the DataModule by the CLI.
        class_names: names of the classes, saved with the checkpoint for prediction.
        optimizer: optimizer factory (LightningCLI injects `--model.optimizer`).
        lr_scheduler: scheduler factory; None for a constant learning rate.
        scheduler_interval: step the scheduler per optimizer "step" or per "epoch".
        lr_reference_batch: when set, the optimizer's lr is per this many images of global batch and is
            scaled by devices x num_nodes x batch_size x accumulate_grad_batches / lr_reference_batch.
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha: Beta(alpha, alpha) of mixup; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) of cutmix; 0 disables it.
        no_weight_decay_on_norm_and_bias: exempt norm and bias parameters from weight decay.
        channels_last: run the network in NHWC memory format (faster on GPUs and on this CPU).
        compile: `torch.compile` the network.
        predict_top_k: how many classes `predict_step` returns per image.
        nonfinite_loss: on a NaN/inf training loss, "stop" training (naming the step and the last checkpoint)
            or "skip" the step on all ranks and count it (see `resnet_lit.fault_tolerance.nonfinite`).
        init_from: start from the network weights of this checkpoint (fine-tuning; not a resume, which is
            `--ckpt_path`). Not saved in the hyperparameters.
        reinit_head: with `init_from`, keep a freshly initialised classifier head, e.g. for other classes.
    """

    def __init__(
        self,
        arch: str = "resnet20",
        net: NetworkConfig | None = None,
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 3,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        lr_reference_batch: PositiveInt | None = None,
        label_smoothing: NonNegativeFloat = 0.0,
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        no_weight_decay_on_norm_and_bias: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        predict_top_k: PositiveInt = 5,
        nonfinite_loss: NonFinitePolicy = "stop",
        init_from: str | None = None,
        reinit_head: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(net, dict):  # from a checkpoint's hyper_parameters
            net = NetworkConfig(**net)
        net = net or NetworkConfig()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "net", "init_from", "reinit_head"])
        self.hparams["net"] = net.overrides()
        # Checkpoints must load with torch.load(weights_only=True): keep hyperparameters plain builtins.
        self.hparams.update(plain_data(dict(self.hparams)))

        self.net = create_model(arch, num_classes=num_classes, in_channels=in_channels, **net.overrides())
        if init_from is not None:
            rank_zero_info(load_network_weights(self.net, init_from, reinit_head))
        elif reinit_head:
            raise CheckpointMismatchError("model.reinit_head needs model.init_from (the checkpoint to fine-tune from)")
        self.nonfinite = NonFiniteLossGuard(nonfinite_loss)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
        self.batch_mixer = _batch_mixer(num_classes, mixup_alpha, cutmix_alpha)

        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5 = _top5_accuracy(num_classes)
        self.test_acc_top5 = _top5_accuracy(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        hard_targets = targets
        if self.batch_mixer is not None:
            images, targets = self.batch_mixer(images, targets)
            hard_targets = targets.argmax(dim=1)
        self.nonfinite.before_forward(self.net)
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        if self.nonfinite.policy == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite.skipped), on_step=True, on_epoch=False)
        # Under the "skip" policy this is collective: all ranks agree before anyone drops the step.
        if self._trainer is not None and self.nonfinite.after_loss(self._trainer, loss, batch_idx):
            return self.nonfinite.skip_loss(self)  # zero gradients, discarded in on_before_optimizer_step
        # Per step only what costs nothing: no host sync, no batch-level metric value (see docs/performance.md).
        self.train_acc.update(logits.detach(), hard_targets)  # train/acc is logged once, at the epoch end
        # The mean over all processes: the loss of the global batch this optimizer step used.
        self.log("train/loss", loss, sync_dist=True)
        if self._trainer is None or batch_idx % max(1, self._trainer.log_every_n_steps) == 0:
            # The progress bar converts its values with .item() after every step, a host-device sync on GPUs:
            # give it a CPU copy, refreshed only when the logger syncs anyway.
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.nonfinite.check(self.trainer)  # "stop" policy: raises NonFiniteLossError naming the bad step

    def on_train_epoch_end(self) -> None:
        self.nonfinite.check(self.trainer)
        self.log("train/acc", self.train_acc)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.before_optimizer_step(optimizer)

    def on_train_end(self) -> None:
        self.nonfinite.check(self.trainer)
        self.nonfinite.summarize()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:
            self.nonfinite.check(self.trainer)  # never write a checkpoint after a non-finite loss
        checkpoint["nonfinite_skipped"] = self.nonfinite.skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.strict_loading:  # restoring through a Trainer (CLI --ckpt_path)
            check_checkpoint_fits(self, checkpoint)  # lists mismatched keys and shapes, not torch's wall of text
        self.nonfinite.skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        mean_loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        top5 = getattr(self, f"{stage}_acc_top5")
        # torchmetrics objects sum counts over all ranks at epoch end, so distributed results are exact
        # even when ranks hold different numbers of samples.
        mean_loss.update(loss, weight=targets.shape[0])
        acc.update(logits, targets)
        self.log(f"{stage}/loss", mean_loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if top5 is not None:
            top5.update(logits, targets)
            self.log(f"{stage}/acc_top5", top5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Any], batch_idx: int) -> dict[str, Any]:
        """Top-k class indices, names and probabilities per image, plus whatever identifies the images."""
        images, keys = batch
        probs = self(images).softmax(dim=1)
        k = min(self.hparams.predict_top_k, probs.shape[1])
        top_probs, top_classes = probs.topk(k, dim=1)
        return {
            "keys": keys,
            "classes": top_classes.cpu(),
            "probs": top_probs.float().cpu(),
            "class_names": [[self.class_names[i] for i in row] for row in top_classes.tolist()],
        }

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(
            param_groups(self.net, self.hparams.no_weight_decay_on_norm_and_bias)
        )
        self._scale_learning_rate(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):
            steps = self.trainer.estimated_stepping_batches
            if self.hparams.scheduler_interval == "epoch":
                steps = self.trainer.max_epochs
            scheduler.set_total_steps(int(steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }

    def _scale_learning_rate(self, optimizer: torch.optim.Optimizer) -> None:
        reference = self.hparams.lr_reference_batch
        if reference is None:
            return
        global_batch = global_batch_size(self.trainer)
        factor = global_batch / reference
        scale_learning_rate(optimizer, factor)
        rank_zero_info(
            f"resnet-lit: learning rate scaled by global batch {global_batch} / {reference} = {factor:g} "
            f"(lr now {[g['lr'] for g in optimizer.param_groups]}); set model.lr_reference_batch: null to disable"
        )


def plain_data(value: Any) -> Any:
    """`value` with int/float/str subclasses (e.g. jsonargparse's PositiveInt) and tuples turned into builtins."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    for builtin in (bool, int, float, str):
        if isinstance(value, builtin):
            return builtin(value)
    return value


def global_batch_size(trainer: L.Trainer) -> int:
    """Images per optimizer step over all processes: devices x nodes x per-process batch x accumulation."""
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is None:
        raise ValueError("lr_reference_batch needs a DataModule with a `batch_size` attribute")
    return trainer.world_size * int(batch_size) * trainer.accumulate_grad_batches


def _top5_accuracy(num_classes: int) -> MulticlassAccuracy | None:
    """Top-5 accuracy, or None where it is meaningless (fewer than 5 classes)."""
    return MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes >= 5 else None


def _batch_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> nn.Module | None:
    mixers: list[nn.Module] = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
