"""The weight average of `model.ema_decay`: its warmed-up update, its use in validation/test/predict, exact resume,
no update on a step dropped for a non-finite loss, `init_from` of its weights, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from faultinject import QUICKSTART, QUIET
from lightning.pytorch.callbacks import Callback
from torch import nn

from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.data import SyntheticDataModule
from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpoint_io import check_checkpoint_fits, load_network_weights
from resnet_lit.finetuning.ema import WeightEMA, warmed_up_decay
from resnet_lit.module import ResNetClassifier

TOLERANCE = 1e-6
# ResNet-8 on the digits, 5 steps per epoch, 2 validation batches, constant lr: a second per epoch.
SMALL_FIT = ["fit", "--config", QUICKSTART, "--model.net.layers", "[1, 1, 1]", "--model.lr_scheduler", "null",
             "--model.ema_decay", "0.9", "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2",
             "--trainer.deterministic", "true", "--trainer.log_every_n_steps", "1", *QUIET]  # fmt: skip
SMALL_NET = {"arch": "resnet20", "net": {"layers": [1, 1, 1], "strides": [1, 2, 2]}, "in_channels": 1}


def _save(model: ResNetClassifier, path: Path) -> None:
    """A checkpoint file as `load_from_checkpoint` reads it."""
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**state, "pytorch-lightning_version": L.__version__}, path)


def _ema_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("ema.")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of SMALL_FIT for 4 epochs in one go."""
    root = tmp_path_factory.mktemp("ema_uninterrupted")
    cli = ResNetLitCLI(args=[*SMALL_FIT, "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(root)])
    assert cli.model.ema is not None and cli.model.ema.updates == 20
    torch.save({k: float(v) for k, v in cli.trainer.callback_metrics.items()}, root / "metrics.pt")
    return root


def test_update_is_the_warmed_up_average_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net.to(memory_format=torch.channels_last)
    ema = WeightEMA(net, decay=0.5)
    expected = {key: value.clone() for key, value in net.state_dict().items()}
    for n in range(6):
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param))
        net(torch.randn(8, 1, 6, 6))  # training mode: moves the BatchNorm statistics and counts the batch
        ema.update(net)
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818..., 0.25, ... then 0.5 from n = 8 on
        assert warmed_up_decay(0.5, n) == decay
        for key, live in net.state_dict().items():
            if live.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * live
            else:
                expected[key] = live.clone()
    assert ema.updates == 6
    averaged = ema.net.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-6, msg=key)
    assert int(averaged["1.num_batches_tracked"]) == 6
    assert not any(p.requires_grad for p in ema.net.parameters())
    assert ema.net[0].weight.is_contiguous(memory_format=torch.channels_last)

    restored = WeightEMA(net, decay=0.5)  # the count travels in the state dict, as a tensor
    assert all(isinstance(v, torch.Tensor) for v in ema.state_dict().values())
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 6


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_bad_ema_decay_is_one_line_naming_the_key(decay: float) -> None:
    with pytest.raises(ResNetLitError, match=r"^model\.ema_decay must be in \(0, 1\).*got") as error:
        ResNetClassifier(**SMALL_NET, ema_decay=decay)
    assert "\n" not in str(error.value)


def test_bad_ema_decay_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL_FIT, "--model.ema_decay", "1", "--trainer.max_epochs", "1"])
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert "model.ema_decay must be in (0, 1)" in message and "got 1" in message
    assert "Traceback" not in message


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_validation_test_and_predict_use_the_average() -> None:
    torch.manual_seed(0)
    data = SyntheticDataModule(num_classes=4, in_channels=1, image_size=8, num_samples=32, num_val_samples=32,
                               num_test_samples=32, batch_size=16, num_workers=0, loader="dataloader")  # fmt: skip
    model = ResNetClassifier(**SMALL_NET, num_classes=4, ema_decay=0.9)
    with torch.no_grad():  # an average apart from the live network
        for param in model.ema.net.parameters():
            param.add_(0.1 * torch.randn_like(param))
    plain = ResNetClassifier(**SMALL_NET, num_classes=4)
    plain.net.load_state_dict(model.ema.net.state_dict())
    live = ResNetClassifier(**SMALL_NET, num_classes=4)
    live.net.load_state_dict(model.net.state_dict())

    for run in ("validate", "test"):
        averaged = getattr(_trainer(), run)(model, datamodule=data)[0]
        assert averaged == getattr(_trainer(), run)(plain, datamodule=data)[0]
        assert averaged != getattr(_trainer(), run)(live, datamodule=data)[0]
    data.setup("test")  # predict on the test batches: their labels stand in for the image keys
    predicted = _trainer().predict(model, dataloaders=data.test_dataloader())
    expected = _trainer().predict(plain, dataloaders=data.test_dataloader())
    for ours, theirs in zip(predicted, expected, strict=True):
        assert torch.equal(ours["classes"], theirs["classes"]) and torch.equal(ours["probs"], theirs["probs"])


def test_resume_after_two_epochs_matches_the_uninterrupted_run(tmp_path: Path, uninterrupted: Path) -> None:
    run = [*SMALL_FIT, "--trainer.default_root_dir", str(tmp_path)]
    ResNetLitCLI(args=[*run, "--trainer.max_epochs", "2"])
    halfway = _ema_state(tmp_path / "checkpoints" / "last.ckpt")
    assert int(halfway["ema._extra_state"]) == 10

    resumed = ResNetLitCLI(args=[*run, "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 20 and resumed.model.ema.updates == 20
    expected = torch.load(uninterrupted / "metrics.pt")
    metrics = {key: float(value) for key, value in resumed.trainer.callback_metrics.items()}
    assert metrics["val/loss"] == pytest.approx(expected["val/loss"], abs=TOLERANCE)
    final = _ema_state(tmp_path / "checkpoints" / "last.ckpt")
    reference = _ema_state(uninterrupted / "checkpoints" / "last.ckpt")
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=TOLERANCE, msg=key)


class AverageAroundStep(Callback):
    """Records the weight average's count and state before and after training steps `step` and `step` + 1."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: dict[int, tuple[int, dict[str, torch.Tensor], int, dict[str, torch.Tensor]]] = {}
        self._before: tuple[int, dict[str, torch.Tensor]] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in (self.step, self.step + 1):
            self._before = (pl_module.ema.updates, _copy(pl_module.ema.net))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._before is not None:
            self.seen[trainer.global_step - 1] = (*self._before, pl_module.ema.updates, _copy(pl_module.ema.net))
            self._before = None


def _copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in net.state_dict().items()}


def test_a_step_dropped_for_a_nonfinite_loss_leaves_the_average_alone(tmp_path: Path) -> None:
    args = [*SMALL_FIT, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path), "--model.nonfinite_loss", "skip",
            "--trainer.callbacks+=faultinject.NaNAtStep", "--trainer.callbacks.step=3",
            "--trainer.callbacks+=test_ema.AverageAroundStep", "--trainer.callbacks.step=3"]  # fmt: skip
    cli = ResNetLitCLI(args=args)
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AverageAroundStep))
    count_before, before, count_after, after = recorder.seen[3]  # the NaN step: dropped
    assert (count_before, count_after) == (3, 3)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    count_before, before, count_after, after = recorder.seen[4]  # the next step: averaged again
    assert (count_before, count_after) == (3, 4)
    assert any(not torch.equal(value, after[key]) for key, value in before.items())
    assert cli.model.ema.updates == 4  # 5 steps, one dropped


def test_init_from_a_checkpoint_with_an_average_loads_the_average(uninterrupted: Path) -> None:
    checkpoint = uninterrupted / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    averaged = {key[len("ema.net.") :]: v for key, v in state.items() if key.startswith("ema.net.")}
    trained = {key[len("net.") :]: v for key, v in state.items() if key.startswith("net.")}
    assert any(not torch.equal(averaged[key], trained[key]) for key in trained)

    net = ResNetClassifier(**SMALL_NET).net
    report = load_network_weights(net, str(checkpoint), reinit_head=False)
    assert report.endswith(f"tensors of the network from {checkpoint} (its weight average, model.ema_decay)")
    for key, value in net.state_dict().items():
        assert torch.equal(value, averaged[key]), key

    # Fine-tuning with its own average: that average starts from the loaded weights.
    model = ResNetClassifier(**SMALL_NET, init_from=str(checkpoint), ema_decay=0.99)
    for key, value in model.ema.net.state_dict().items():
        assert torch.equal(value, averaged[key]), key
    assert model.ema.updates == 0


def test_checkpoint_without_average_starts_it_from_its_weights_and_back(tmp_path: Path) -> None:
    """A checkpoint of a run without `ema_decay` loads into a model with it (the average starts from its network
    weights, count 0), and an average in a checkpoint is dropped by a model without one."""
    torch.manual_seed(0)
    without = ResNetClassifier(**SMALL_NET)
    path = tmp_path / "without.ckpt"
    _save(without, path)
    model = ResNetClassifier.load_from_checkpoint(path, ema_decay=0.9)
    assert model.ema is not None and model.ema.updates == 0
    for key, value in without.net.state_dict().items():
        assert torch.equal(model.ema.net.state_dict()[key], value), key

    checkpoint = torch.load(path, weights_only=True)
    model.on_load_checkpoint(checkpoint)
    check_checkpoint_fits(model, checkpoint)  # the CLI resume's check passes after the alignment

    model.ema.updates = 7
    path_with = tmp_path / "with.ckpt"
    _save(model, path_with)
    assert ResNetClassifier.load_from_checkpoint(path_with).ema.updates == 7
    assert ResNetClassifier.load_from_checkpoint(path_with, ema_decay=None).ema is None


def test_resuming_a_run_without_average_with_ema_decay_starts_the_average(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = [*SMALL_FIT, "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "0"]
    ResNetLitCLI(args=[*run, "--trainer.max_epochs", "1", "--model.ema_decay", "null"])
    resumed = ResNetLitCLI(args=[*run, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 10 and resumed.model.ema.updates == 5
    assert "the average starts from its network weights" in caplog.text
