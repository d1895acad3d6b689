"""`model.freeze_stages` / `model.unfreeze_at_epoch`: the stem and the first stages keep their weights and BatchNorm
statistics bit for bit until the unfreeze epoch, then train at the schedule's lr; exact resume across the
boundary; one-line errors; and under 2-process DDP the unfrozen stages stay identical on both ranks.

Runs: the quickstart (ResNet-20, 3 stages, on the digits) cut to 4 training batches of 32 per epoch, so the
quickstart's cosine schedule (no warmup at this length: 0.05 x 12 steps rounds to 0) spans 12 steps.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from faultinject import LAUNCHER_VARS, Crash, checkpoint_step, fault_env
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_lit import ResNetClassifier
from resnet_lit.cli import ResNetLitCLI, main
from threads import one_intra_op_thread

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
BATCHES, LR, MOMENTUM, WEIGHT_DECAY = 4, 0.1, 0.9, 5e-4  # the quickstart's SGD: nesterov, norms and biases exempt
RUN = ["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
       "false", "--trainer.limit_train_batches", str(BATCHES), "--trainer.limit_val_batches", "2",
       "--trainer.max_epochs", "3", "--data.init_args.batch_size", "32",
       "--model.freeze_stages", "2", "--model.unfreeze_at_epoch", "2"]  # fmt: skip
FROZEN_PREFIXES = ("stem.", "stages.0.", "stages.1.")  # freeze_stages 2 of ResNet-20's 3 stages


def is_frozen(name: str) -> bool:
    return name.startswith(FROZEN_PREFIXES)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def cosine_lr(step: int, total: int) -> float:
    return LR * 0.5 * (1.0 + math.cos(math.pi * step / total))


class FreezeRecorder(Callback):
    """The network's weights and buffers at train start and after every epoch (validation included), the modes
    of the frozen part's BatchNorm layers at every batch, and the first update of a frozen conv after the unfreeze.

    Runs before the module's own `on_before_optimizer_step`, so it sees the gradients of the frozen stages."""

    def __init__(self, watch_step: int = 2 * BATCHES) -> None:
        self.watch_step = watch_step
        self.states: dict[str, dict[str, Tensor]] = {}
        self.frozen_norms_training: dict[int, set[bool]] = {}
        self.frozen_grads_seen = 0
        self.update: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.states["start"] = snapshot(pl_module.net)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        norms = [m for name, m in pl_module.net.named_modules() if is_frozen(name + ".") and isinstance(m, _BatchNorm)]
        modes = self.frozen_norms_training.setdefault(trainer.current_epoch, set())
        modes.update(norm.training for norm in norms)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        conv = pl_module.net.stages[0][0].conv1.weight
        self.frozen_grads_seen += conv.grad is not None
        if trainer.global_step == self.watch_step:
            group = next(g for g in optimizer.param_groups if any(p is conv for p in g["params"]))
            head_in_group = any(p is pl_module.net.head.fc.weight for p in group["params"])
            self.update = {"before": conv.detach().clone(), "grad": conv.grad.clone(), "lr": group["lr"],
                           "momentum_buffer": optimizer.state.get(conv, {}).get("momentum_buffer"),
                           "head_in_group": head_in_group}  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.update and "after" not in self.update:
            self.update["after"] = pl_module.net.stages[0][0].conv1.weight.detach().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.states[f"epoch{trainer.current_epoch}"] = snapshot(pl_module.net)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny model: one intra-op thread is as fast, and does not stall when another process holds a core."""
    with one_intra_op_thread():
        yield


def recorder_of(cli: ResNetLitCLI) -> FreezeRecorder:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, FreezeRecorder))


def test_frozen_stages_keep_weights_and_bn_statistics_bit_for_bit_until_the_unfreeze_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Validation also in the middle of each epoch: the frozen BatchNorm layers must come back from it in eval mode.
    cli = ResNetLitCLI(args=[*RUN, "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.callbacks+=test_freezing.FreezeRecorder"])  # fmt: skip
    recorder, states = recorder_of(cli), recorder_of(cli).states
    start = states["start"]
    for epoch in ("epoch0", "epoch1"):
        for name, value in states[epoch].items():
            if is_frozen(name):  # weights, running_mean/var and num_batches_tracked, exactly
                assert torch.equal(value, start[name]), f"{name} moved while frozen ({epoch})"
    moved = [name for name, value in states["epoch0"].items() if not torch.equal(value, start[name])]
    assert any(n.startswith("stages.2.") and n.endswith("conv1.weight") for n in moved)
    assert any(n.startswith("stages.2.") and n.endswith("running_mean") for n in moved)
    assert "head.fc.weight" in moved
    # The backward pass still ran through the frozen stages (their gradients were dropped, not never computed).
    assert recorder.frozen_grads_seen == 3 * BATCHES
    assert recorder.frozen_norms_training == {0: {False}, 1: {False}, 2: {True}}

    after = states["epoch2"]
    for suffix in ("conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked"):
        assert not torch.equal(after[f"stages.0.0.{suffix}"], start[f"stages.0.0.{suffix}"]), suffix
    assert not torch.equal(after["stem.conv.weight"], start["stem.conv.weight"])
    out = caplog.text  # logged once each
    assert out.count("are frozen until epoch 2") == 1 and out.count("epoch 2: the stem and the first 2") == 1


RESUMABLE = [*RUN, "--checkpoint.every_n_train_steps", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[FreezeRecorder, dict[str, Tensor]]:
    """The uninterrupted 3-epoch run: its recorder, and its network's final weights and buffers."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = ResNetLitCLI(args=[*RESUMABLE, "--trainer.default_root_dir", str(root),
                             "--trainer.callbacks+=test_freezing.FreezeRecorder"])  # fmt: skip
    assert cli.trainer.global_step == 3 * BATCHES
    return recorder_of(cli), snapshot(cli.model.net)


def test_unfrozen_stages_train_at_the_schedules_lr_with_fresh_momentum(
    uninterrupted: tuple[FreezeRecorder, dict[str, Tensor]],
) -> None:
    update = uninterrupted[0].update
    assert update["head_in_group"]  # the same group as the head's weights: no group of its own
    assert update["lr"] == pytest.approx(cosine_lr(2 * BATCHES, 3 * BATCHES), rel=1e-12)  # 0.025, not 0.1
    # No momentum or weight decay while frozen: the first step after the unfreeze is SGD's very first step,
    # nesterov with a fresh buffer, p -= lr x (1 + momentum) x (grad + weight_decay x p).
    assert update["momentum_buffer"] is None
    step = update["lr"] * (1 + MOMENTUM) * (update["grad"] + WEIGHT_DECAY * update["before"])
    torch.testing.assert_close(update["after"], update["before"] - step, rtol=1e-5, atol=1e-7)
    assert not torch.equal(update["after"], update["before"])


@pytest.mark.parametrize(("crash_step", "saved_step"), [(2 * BATCHES, 2 * BATCHES), (6, 6)],
                         ids=["after-epoch-1", "mid-epoch-1"])  # fmt: skip
def test_resume_across_the_unfreeze_epoch_matches_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[FreezeRecorder, dict[str, Tensor]], crash_step: int, saved_step: int
) -> None:
    # Mid-epoch, Lightning calls no on_train_epoch_start: the frozen state must come from on_train_start.
    run = [*RESUMABLE, "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(Crash):
        ResNetLitCLI(args=[*run, "--trainer.callbacks+=faultinject.CrashAtStep",
                           f"--trainer.callbacks.step={crash_step}"])  # fmt: skip
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == saved_step  # before the unfreeze
    resumed = ResNetLitCLI(args=[*run, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3 * BATCHES
    expected, actual = uninterrupted[1], snapshot(resumed.model.net)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def not_a_resnet(num_classes: int = 10, in_channels: int = 3, **_: Any) -> nn.Module:
    """A model factory building something other than a resnet_lit ResNet."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--model.freeze_stages", "4"], "model.freeze_stages is 4 but model.arch 'resnet20' has 3 stages"),
        (["--model.unfreeze_at_epoch", "3"], "model.unfreeze_at_epoch (3) needs model.freeze_stages of 1 or more"),
        (["--model.freeze_stages", "1", "--model.arch", f"{__name__}.not_a_resnet"],
         f"model.freeze_stages needs a resnet_lit ResNet (stem, stages, head), but model.arch "
         f"'{__name__}.not_a_resnet' builds a Sequential"),
    ],
    ids=["more-than-the-stages", "unfreeze-without-freeze", "not-a-resnet"],
)  # fmt: skip
def test_bad_freezing_options_are_one_line_errors_naming_the_key(options: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data", "SyntheticDataModule", "--trainer.max_steps", "1", "--trainer.logger", "false",
              *options])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith(f"resnet-lit: error: {expected}") and "\n" not in message, message


def test_train_mode_switches_keep_the_frozen_norms_in_eval_until_the_unfreeze() -> None:
    module = ResNetClassifier(arch="resnet20", freeze_stages=1, unfreeze_at_epoch=3)
    net = module.net
    frozen_norms = [m for part in (net.stem, net.stages[0]) for m in part.modules() if isinstance(m, _BatchNorm)]
    other_norms = [m for m in net.stages[1].modules() if isinstance(m, _BatchNorm)]
    module.train()
    assert all(m.training for m in frozen_norms)  # nothing frozen before training starts
    module.freezer.start_epoch(2, training=True)
    assert not any(m.training for m in frozen_norms) and all(m.training for m in other_norms)
    module.eval()
    module.train()
    assert not any(m.training for m in frozen_norms) and all(m.training for m in other_norms)
    module.freezer.start_epoch(3, training=True)
    assert all(m.training for m in frozen_norms)


# --- 2-process DDP --------------------------------------------------------------------------------------------
class RankStates(Callback):
    """Each rank saves its network's parameters and BatchNorm statistics at train start and after every epoch to
    `<folder>/rank<R>_<when>.pt`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _save(self, trainer: pl.Trainer, pl_module: Any, when: str) -> None:
        torch.save(snapshot(pl_module.net), self.folder / f"rank{trainer.global_rank}_{when}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_unfrozen_stages_stay_identical_on_both_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in LAUNCHER_VARS:
            monkeypatch.delenv(key)
    states = tmp_path / "states"
    states.mkdir()
    # Each rank sees its own half of every global batch: without gradient averaging the ranks would part.
    args = [*RUN, "--model.unfreeze_at_epoch", "1", "--trainer.max_epochs", "2", "--data.init_args.batch_size", "16",
            "--trainer.num_sanity_val_steps", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.callbacks+=test_freezing.RankStates", f"--trainer.callbacks.folder={states}"]  # fmt: skip
    env = fault_env(MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "resnet_lit", *args], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    def load(rank: int, when: str) -> dict[str, Tensor]:
        return torch.load(states / f"rank{rank}_{when}.pt", weights_only=True)

    start = load(0, "start")
    parameters = {name for name, _ in ResNetClassifier(arch="resnet20", in_channels=1).net.named_parameters()}
    for when in ("epoch0", "epoch1"):
        ranks = [load(0, when), load(1, when)]
        for name in parameters:  # BatchNorm statistics of trained stages are each rank's own; weights are shared
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks after {when}"
    for rank in (0, 1):
        for name, value in load(rank, "epoch0").items():
            if is_frozen(name):
                assert torch.equal(value, start[name]), f"{name} moved while frozen on rank {rank}"
    after = load(0, "epoch1")
    assert not torch.equal(after["stages.0.0.conv1.weight"], start["stages.0.0.conv1.weight"])
    assert not torch.equal(after["stem.conv.weight"], start["stem.conv.weight"])
