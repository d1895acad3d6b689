"""`ResNetClassifier`: the LightningModule that trains any network of the zoo.

Shaped like torchgeo's `ClassificationTask`: `configure_*` methods build the network, the batch mixer and one
`MetricCollection` that is cloned per stage. The non-finite loss policy is a callback
(`resnet_lit.fault_tolerance.nonfinite`) that reads `nonfinite_loss` from the hyperparameters.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpoint_io import (
    CheckpointMismatchError,
    check_checkpoint_fits,
    load_network_weights,
)
from resnet_lit.fault_tolerance.checkpointing import in_gradient_accumulation
from resnet_lit.fault_tolerance.distributed import is_sync_step
from resnet_lit.fault_tolerance.nonfinite import NonFinitePolicy, optimizer_step_dropped
from resnet_lit.finetuning.ema import WeightEMA, align_ema_state
from resnet_lit.finetuning.freezing import StageFreezer
from resnet_lit.finetuning.preprocessing import normalisation_mismatch
from resnet_lit.finetuning.tta import TestTimeAugmentation, augmented_logits
from resnet_lit.models import NetworkConfig, create_model
from resnet_lit.models.pretrained import is_named_source, resolve_named_source
from resnet_lit.optim import (
    apply_lr_scales,
    check_layer_decay,
    param_groups,
    rescale_restored_lr,
    restored_base_lrs,
    scale_learning_rate,
)

# Checkpoint entry: the optimizer's learning rate per parameter group as configured, before batch scaling.
CONFIGURED_LR_KEY = "resnet_lit_configured_lr"


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
        grad_checkpointing: recompute each block's activations in the backward pass instead of keeping them
            (the network's `set_grad_checkpointing`): much less activation memory for about one more forward pass
            per step; training is the same, BatchNorm statistics included. See
            :mod:`resnet_lit.models.grad_checkpoint`.
        predict_top_k: how many classes `predict_step` returns per image.
        nonfinite_loss: on a NaN/inf training loss, "stop" training (naming the step and the last checkpoint)
            or "skip" the step on all ranks and count it; applied by the `NonFiniteLossPolicy` callback.
        init_from: start from the network weights of this checkpoint (fine-tuning; not a resume, which is
            `--ckpt_path`). Not saved in the hyperparameters.
        reinit_head: with `init_from`, keep a freshly initialised classifier head, e.g. for other classes.
        layer_decay: layer-wise LR decay in (0, 1]: each block's lr is multiplied by layer_decay ** (its distance
            from the head: head 0, last block 1, ..., stem number of blocks + 1); resnet_lit ResNets only.
        class_weights: weights of the training loss per class: a list of num_classes values, or "balanced"
            (n_samples / (num_classes x samples of the class), from the DataModule's `class_counts()` of the
            training split). The validation and test loss stay unweighted, so `val/loss` compares across runs.
        freeze_stages: freeze the stem and the first K stages (0: nothing): their weights stay as loaded and their
            BatchNorm layers stay in eval mode; see :mod:`resnet_lit.finetuning.freezing`.
        unfreeze_at_epoch: train the frozen part from this epoch on, at the lr the schedule gives then (None: stay
            frozen).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9998; None: off),
            warmed up over the first updates; validation, test, predict and the best checkpoint use it. See
            :mod:`resnet_lit.finetuning.ema`.
        tta: test-time augmentation of validation, test and predict: "flip" averages the logits of each image and
            its mirror image; "none" turns it off.
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
        grad_checkpointing: bool = False,
        predict_top_k: PositiveInt = 5,
        nonfinite_loss: NonFinitePolicy = "stop",
        init_from: str | None = None,
        reinit_head: bool = False,
        layer_decay: float | None = None,
        class_weights: Literal["balanced"] | list[NonNegativeFloat] | None = None,
        freeze_stages: NonNegativeInt = 0,
        unfreeze_at_epoch: PositiveInt | None = None,
        ema_decay: float | None = None,
        tta: TestTimeAugmentation = "none",
    ) -> None:
        super().__init__()
        if isinstance(net, dict):  # from a checkpoint's hyper_parameters
            net = NetworkConfig(**net)
        net = net or NetworkConfig()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}")
        if isinstance(class_weights, list | tuple) and len(class_weights) != num_classes:
            raise ResNetLitError(
                f"model.class_weights has {len(class_weights)} entries but model.num_classes is {num_classes}"
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "net", "init_from", "reinit_head"])
        self.hparams["net"] = net.overrides()
        # Checkpoints must load with torch.load(weights_only=True): keep hyperparameters plain builtins.
        self.hparams.update(plain_data(dict(self.hparams)))
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.configured_lrs: list[float] | None = None  # the optimizer's lr per group, set by configure_optimizers
        self._scaled_lrs: list[float] = []
        self._restored_lrs: list[float] | None = None  # the checkpoint's configured lr, while resuming a fit
        self.configure_network(init_from, reinit_head)
        check_layer_decay(self.net, layer_decay, arch)
        self.freezer = StageFreezer(self.net, freeze_stages, unfreeze_at_epoch, arch)
        # The training loss's class weights (None: unweighted); "balanced" is filled in at setup("fit").
        weights = torch.tensor(class_weights, dtype=torch.float32) if isinstance(class_weights, list | tuple) else None
        self.register_buffer("class_weight", weights, persistent=False)
        self.configure_batch_mixer()
        self.configure_metrics()

    def configure_network(self, init_from: str | None = None, reinit_head: bool = False) -> None:
        """`self.net` from the hyperparameters, optionally with the weights of the checkpoint `init_from`."""
        hparams = self.hparams
        self.net = create_model(hparams.arch, num_classes=hparams.num_classes, in_channels=hparams.in_channels,
                                **hparams.net)  # fmt: skip
        if init_from is not None:
            rank_zero_info(load_network_weights(self.net, init_from, reinit_head))
        elif reinit_head:
            raise CheckpointMismatchError("model.reinit_head needs model.init_from (the checkpoint to fine-tune from)")
        if hparams.get("grad_checkpointing"):
            if not callable(getattr(self.net, "set_grad_checkpointing", None)):
                raise ResNetLitError(
                    f"model.grad_checkpointing: true needs a network with set_grad_checkpointing(), but model.arch "
                    f"{hparams.arch!r} builds a {type(self.net).__name__}; set model.grad_checkpointing: false"
                )
            self.net.set_grad_checkpointing(True)
        # What the weights were trained with, compared with the data's normalisation at setup (named sources only).
        self.pretrained_source = resolve_named_source(init_from) if init_from and is_named_source(init_from) else None
        if hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Copied before compiling: a compiled module is not safe to deep-copy.
        ema_decay = hparams.get("ema_decay")
        self.ema = WeightEMA(self.net, ema_decay) if ema_decay is not None else None
        if hparams.compile:
            self.net.compile()
            if self.ema is not None:
                self.ema.net.compile()

    def configure_batch_mixer(self) -> None:
        """`self.batch_mixer`: MixUp or CutMix (one of both, chosen per batch, when both are on), or None."""
        hparams = self.hparams
        mixers: list[nn.Module] = []
        if hparams.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=hparams.mixup_alpha, num_classes=hparams.num_classes))
        if hparams.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=hparams.cutmix_alpha, num_classes=hparams.num_classes))
        self.batch_mixer = v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)

    def configure_metrics(self) -> None:
        """One collection of loss, accuracy and (5 classes or more) top-5 accuracy, cloned for validation and
        test; training keeps only the accuracy, since its loss is logged at the logging steps.

        Updates never sync the host with the device: no argument validation (its checks read values on the
        host), and a NaN loss is summed in like any other value (so the mean is NaN) rather than looked for.
        """
        num_classes = self.hparams.num_classes
        metrics: dict[str, Any] = {
            "loss": MeanCrossEntropy(),
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "acc_macro": MacroAccuracy(num_classes),
        }
        if num_classes >= 5:  # top-5 of fewer classes is always 1
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
        # One metric per group: the resume code saves and restores every metric's state on every rank.
        collection = MetricCollection(metrics, compute_groups=False)
        self.train_metrics = MetricCollection({"acc": metrics["acc"].clone()}, prefix="train/", compute_groups=False)
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")
        # Not logged (a matrix): read by the `PerClassReport` callback through `confusion_matrix(stage)`.
        self.val_confusion = ConfusionCounts(num_classes)
        self.test_confusion = ConfusionCounts(num_classes)

    def confusion_matrix(self, stage: Literal["val", "test"]) -> Tensor:
        """The epoch's confusion matrix (rows: true class, columns: predicted), summed over all processes.

        A collective under DDP: call it on every rank."""
        return (self.val_confusion if stage == "val" else self.test_confusion).compute()

    def setup(self, stage: str) -> None:
        self._restored_lrs = None
        datamodule = self.trainer.datamodule if _attached_to_a_trainer(self) else None
        if stage == "fit" and self.hparams.class_weights == "balanced":
            self.class_weight = balanced_class_weights(datamodule, self.hparams.num_classes)
            if getattr(getattr(datamodule, "settings", None), "balanced_sampling", False):
                rank_zero_warn(
                    "resnet-lit: model.class_weights: balanced and data.init_args.balanced_sampling: true both correct "
                    "for the class imbalance, so together they over-correct it; use one of them"
                )
        pipeline = getattr(datamodule, "pipeline", None)
        if self.pretrained_source is not None and pipeline is not None:
            warning = normalisation_mismatch(
                self.pretrained_source.name, self.pretrained_source.preprocessing, pipeline.mean, pipeline.std
            )
            if warning:
                rank_zero_warn(warning)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def inference_network(self) -> nn.Module:
        """The network of validation, test and predict: the weight average with `ema_decay`, else `self.net`."""
        return self.ema.net if self.ema is not None else self.net

    def evaluation_logits(self, images: Tensor) -> Tensor:
        """The logits of validation, test and predict: `inference_network()`, with `model.tta` if set."""
        images = images.contiguous(memory_format=self.memory_format)
        return augmented_logits(self.inference_network(), images, self.hparams.get("tta", "none"))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the weight average's update, unless the non-finite loss policy dropped it."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not optimizer_step_dropped(self.trainer):
            self.ema.update(self.net)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        hard_targets = targets
        if self.batch_mixer is not None:
            images, targets = self.batch_mixer(images, targets)
            hard_targets = targets.argmax(dim=1)
        logits = self(images)
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        loss = F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.hparams.label_smoothing)
        # Per step only what costs nothing: no host sync, no collective, no batch-level metric value (see
        # docs/performance.md); what needs them waits for the logging steps.
        self.train_metrics.update(logits.detach(), hard_targets)  # train/acc is logged once, at the epoch end
        if self._logs_this_step(batch_idx):
            # The mean over all processes (the loss of the global batch this optimizer step used), synced (a
            # barrier and an all-reduce) only at the steps whose logs Lightning writes.
            self.log("train/loss", loss, sync_dist=True)
            # The progress bar converts its values with .item() after every batch: give it a CPU copy, so that
            # its per-batch conversion never waits for the device.
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)
        return loss

    def _logs_this_step(self, batch_idx: int) -> bool:
        """Whether this batch ends an optimizer step after which Lightning writes the step logs (see
        `is_sync_step`); True outside a Trainer, so that a bare `training_step` call logs as before."""
        if not _attached_to_a_trainer(self):
            return True
        trainer = self.trainer
        return not in_gradient_accumulation(trainer, batch_idx) and is_sync_step(trainer, trainer.global_step + 1)

    def train(self, mode: bool = True) -> ResNetClassifier:
        """`nn.Module.train`, keeping the BatchNorm layers of frozen stages in eval mode (see `StageFreezer`)."""
        super().train(mode)
        self.freezer.keep_norms_in_eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.freezer.start_epoch(self.current_epoch, self.training)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.freezer.drop_gradients()  # after fp16 unscaling, before gradient clipping and the step

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics)

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_confusion, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_confusion)

    def _evaluate(
        self,
        batch: tuple[Tensor, Tensor],
        metrics: MetricCollection,
        confusion: ConfusionCounts,
        prog_bar: bool = False,
    ) -> None:
        images, targets = batch
        logits = self.evaluation_logits(images)
        metrics.update(logits, targets)
        confusion.update(logits, targets)
        # Logged as metric objects: Lightning computes them at the epoch end from counts summed over all ranks,
        # so distributed results are exact even when ranks hold different numbers of samples.
        self.log_dict(metrics, prog_bar=prog_bar)

    def predict_step(self, batch: tuple[Tensor, Any], batch_idx: int) -> dict[str, Any]:
        """Top-k class indices, names and probabilities per image, plus whatever identifies the images."""
        images, keys = batch
        probs = self.evaluation_logits(images).softmax(dim=1)
        k = min(self.hparams.predict_top_k, probs.shape[1])
        top_probs, top_classes = probs.topk(k, dim=1)
        return {
            "keys": keys,
            "classes": top_classes.cpu(),
            "probs": top_probs.float().cpu(),
            "class_names": [[self.class_names[i] for i in row] for row in top_classes.tolist()],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        message = align_ema_state(checkpoint.get("state_dict", {}), self.ema)  # before the weights are loaded
        if message:
            rank_zero_info(message)
        if not _attached_to_a_trainer(self):  # load_from_checkpoint
            return
        if self.strict_loading:  # CLI --ckpt_path
            check_checkpoint_fits(self, checkpoint)  # lists mismatched keys and shapes, not torch's wall of text
        if self.trainer.state.fn == TrainerFn.FITTING:  # a resume: compared with the configured lr at train start
            self._restored_lrs = [float(lr) for lr in checkpoint.get(CONFIGURED_LR_KEY, [])]

    def configure_optimizers(self) -> Any:
        hparams = self.hparams
        optimizer = self.optimizer_factory(
            param_groups(self.net, hparams.no_weight_decay_on_norm_and_bias, hparams.get("layer_decay"))
        )
        apply_lr_scales(optimizer)
        self.configured_lrs = [float(group["lr"]) for group in optimizer.param_groups]  # before batch scaling
        self._scale_learning_rate(optimizer)
        self._scaled_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps") and getattr(scheduler, "total_steps", None) is None:
            scheduler.set_total_steps(schedule_length(self.trainer, self.hparams.scheduler_interval))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.configured_lrs is not None:
            checkpoint[CONFIGURED_LR_KEY] = list(self.configured_lrs)

    def on_train_start(self) -> None:
        """A resumed run whose configured lr differs from the checkpoint's continues its schedule at the new lr."""
        self.freezer.start_epoch(self.current_epoch, self.training)  # a resume mid-epoch skips on_train_epoch_start
        restored, self._restored_lrs = self._restored_lrs, None
        if restored is None:
            return
        # The configured lr is compared before batch scaling, so a resume on another number of processes keeps
        # the checkpoint's lr; a checkpoint from before this key existed is compared after scaling.
        configured = self.configured_lrs if restored else self._scaled_lrs
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        old = restored or restored_base_lrs(self.trainer.optimizers[0], schedulers)
        message = rescale_restored_lr(self.trainer.optimizers[0], schedulers, old, configured)
        if message:
            rank_zero_info(message)

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


def schedule_length(trainer: L.Trainer, interval: str) -> int:
    """The run length in scheduler steps: optimizer steps, or epochs for `scheduler_interval: epoch`, as the
    shorter of `trainer.max_epochs` and `trainer.max_steps` (converted to epochs); -1 means "not set"."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if (max_epochs is None or max_epochs < 0) and max_steps < 0:
        raise ResNetLitError(
            f"model.lr_scheduler needs the run length, but trainer.max_epochs ({max_epochs}) and trainer.max_steps "
            f"({max_steps}) are both unlimited: set one of them"
        )
    if interval == "step":
        steps = trainer.estimated_stepping_batches
        if math.isinf(steps) or steps < 0:
            raise ResNetLitError(
                f"model.lr_scheduler needs the run length: the training data has no length, so set "
                f"trainer.max_steps (now {max_steps})"
            )
        return int(steps)
    if max_steps < 0:
        return int(max_epochs)
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # as estimated_stepping_batches does, to count the batches of an epoch
    batches = trainer.num_training_batches
    if math.isinf(batches):
        raise ResNetLitError(
            f"model.scheduler_interval: epoch needs epochs of known length to convert trainer.max_steps "
            f"({max_steps}) into epochs; set trainer.max_epochs, or use scheduler_interval: step"
        )
    steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    epochs = math.ceil(max_steps / steps_per_epoch)
    return epochs if max_epochs is None or max_epochs < 0 else min(int(max_epochs), epochs)


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


def balanced_class_weights(datamodule: Any, num_classes: int) -> Tensor:
    """n_samples / (num_classes x count of the class) from `datamodule.class_counts()` (0 for an absent class)."""
    if not callable(getattr(datamodule, "class_counts", None)):
        raise ResNetLitError(
            f"model.class_weights: balanced needs the class counts of a DataModule with class_counts() (a resnet_lit "
            f"ImageDataModule), got {type(datamodule).__name__}; give model.class_weights as a list instead"
        )
    counts = torch.tensor(datamodule.class_counts(), dtype=torch.float64)
    if len(counts) != num_classes:
        raise ResNetLitError(f"the DataModule counts {len(counts)} classes but model.num_classes is {num_classes}")
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def global_batch_size(trainer: L.Trainer) -> int:
    """Images per optimizer step over all processes: devices x nodes x per-process batch x accumulation."""
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is None:
        raise ValueError("lr_reference_batch needs a DataModule with a `batch_size` attribute")
    return trainer.world_size * int(batch_size) * trainer.accumulate_grad_batches


class MeanCrossEntropy(MeanMetric):
    """Cross-entropy of logits and class indices, averaged over every sample seen (on all ranks).

    No NaN check (`nan_strategy="disable"`), which would read the values on the host: a NaN loss makes the mean
    NaN. (That setting also ignores `weight`, hence one value per sample.)
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("nan_strategy", "disable")
        super().__init__(**kwargs)

    def update(self, logits: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        super().update(F.cross_entropy(logits, targets, reduction="none"))


def confusion_counts(logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """The batch's confusion matrix (rows: true class, columns: predicted) by a scatter-add: unlike
    `torch.bincount`, which torchmetrics uses and which reads the maximum on CUDA, it never syncs with the host."""
    cells = targets.reshape(-1).long() * num_classes + logits.argmax(dim=1).reshape(-1)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=logits.device)
    return counts.scatter_add_(0, cells, torch.ones_like(cells)).view(num_classes, num_classes)


class ConfusionCounts(MulticlassConfusionMatrix):
    """A confusion matrix of counts that never reads values on the host (no argument checks either). Summed over
    all ranks at `compute`, so it is exact under DDP like the logged metrics."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes, validate_args=False, **kwargs)

    def update(self, logits: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        self.confmat += confusion_counts(logits, targets, self.num_classes)


class MacroAccuracy(MulticlassAccuracy):
    """`MulticlassAccuracy(average="macro")` (the mean recall over the classes present) whose update never reads
    values on the host: its per-class counts come from `confusion_counts`."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes, average="macro", validate_args=False, **kwargs)

    def update(self, logits: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        counts = confusion_counts(logits, targets, self.num_classes)
        tp, predicted, actual = counts.diagonal(), counts.sum(dim=0), counts.sum(dim=1)
        self.tp += tp
        self.fp += predicted - tp
        self.fn += actual - tp
        self.tn += targets.numel() - predicted - actual + tp


def _attached_to_a_trainer(module: L.LightningModule) -> bool:
    """Whether `module` is attached to a Trainer (`LightningModule.trainer` raises when it is not)."""
    try:
        return module.trainer is not None
    except RuntimeError:
        return False
