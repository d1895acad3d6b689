"""Faults during training, through the real CLI: NaN losses (stop / skip, also agreed across two DDP processes),
corrupt JPEGs (stop naming the file / skip and count), dataset layout errors raised during fit, and config
errors that must fail before any data is loaded."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from faultinject import AS_TESTED, QUICKSTART, QUIET, NaNAtStep, cli_command, fault_env, last_metric

from fakedata import write_image_folder
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.fault_tolerance import NonFiniteLossError, NonFiniteLossPolicy

SHORT_FIT = ["fit", "--config", QUICKSTART, *AS_TESTED, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
             "--checkpoint.every_n_train_steps", "5", *QUIET]  # fmt: skip
NAN_AT_7 = ["--trainer.callbacks+=faultinject.NaNAtStep", "--trainer.callbacks.step=7"]


def _exit_message(exit_info: pytest.ExceptionInfo[SystemExit], capsys: pytest.CaptureFixture[str]) -> str:
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code) + capsys.readouterr().err


# --- non-finite loss ----------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_step_epoch_and_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*SHORT_FIT, "--trainer.default_root_dir", str(tmp_path), *NAN_AT_7])
    message = str(exit_info.value.code)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert message.startswith("resnet-lit: error: non-finite training loss at step 7 (epoch 0, batch 7)")
    assert f"last good checkpoint: {last} (step 5)" in message
    assert "model.nonfinite_loss: skip" in message and "\n" not in message
    assert torch.load(last, weights_only=True)["global_step"] == 5  # not overwritten after the fault


@pytest.mark.slow
def test_nan_loss_skip_policy_drops_the_step_without_a_trace_and_counts_it(tmp_path: Path) -> None:
    cli = ResNetLitCLI(
        args=[*SHORT_FIT, "--trainer.default_root_dir", str(tmp_path), "--model.nonfinite_loss", "skip", *NAN_AT_7]
    )
    assert cli.trainer.global_step == 19  # a skipped batch still counts as a step of the schedule
    injector = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NaNAtStep))
    assert injector.before is not None and injector.after is not None
    for key, before in injector.before.items():  # weights and BatchNorm statistics untouched by the NaN batch
        assert torch.equal(before, injector.after[key]), key
    assert last_metric(tmp_path / "metrics.csv", "train/nonfinite_skipped") == 1.0
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    assert _skipped_in(tmp_path / "checkpoints" / "last.ckpt") == 1


class _Ranks:
    """A trainer stand-in whose all-reduce(max) sees this rank's flag and the given flags of other ranks."""

    def __init__(self, others: list[bool]) -> None:
        self.others = others
        self.world_size = 1 + len(others)
        self.global_step, self.current_epoch = 12, 3
        self.checkpoint_callbacks: list = []
        self.strategy = self
        self.root_device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max"
        return torch.stack([tensor, *(torch.tensor(int(flag)) for flag in self.others)]).max()


def _skipped_in(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["callbacks"]["NonFiniteLossPolicy"]["skipped"]


def _policy(name: str, module: torch.nn.Module) -> NonFiniteLossPolicy:
    module.hparams = {"nonfinite_loss": name}
    policy = NonFiniteLossPolicy()
    policy.setup(_Ranks([]), module, "fit")
    return policy


def _drops_step(policy: NonFiniteLossPolicy, module: torch.nn.Module, ranks: _Ranks, loss: torch.Tensor) -> bool:
    """Run the policy's hooks around one training step; True when it discarded the step's gradients."""
    policy.on_train_batch_start(ranks, module, None, 3)
    policy.on_before_backward(ranks, module, loss)
    for param in module.parameters():
        param.grad = torch.ones_like(param)
    policy.on_before_optimizer_step(ranks, module, torch.optim.SGD(module.parameters(), lr=0.1))
    return all(param.grad is None for param in module.parameters())


def test_nonfinite_decision_is_the_same_on_every_rank() -> None:
    finite, nan = torch.tensor(0.7), torch.tensor(float("nan"))
    net = torch.nn.Linear(2, 2)
    skip = _policy("skip", net)
    assert not _drops_step(skip, net, _Ranks([False]), finite)
    assert _drops_step(skip, net, _Ranks([True]), finite)  # another rank's NaN: this rank skips too
    assert _drops_step(skip, net, _Ranks([False, False]), nan)
    assert skip.skipped == 2 and skip.state_dict() == {"skipped": 2, "recent": [0, 1, 1]}

    stop = _policy("stop", net)
    ranks = _Ranks([False])
    for _ in range(3):
        assert not _drops_step(stop, net, ranks, finite)  # only recorded, no sync per step
    stop.check(ranks)  # all finite everywhere
    assert not _drops_step(stop, net, ranks, finite)
    ranks.others = [True]  # the other rank saw a NaN since the last check
    with pytest.raises(NonFiniteLossError, match=r"step 12 \(epoch 3, batch 3\), non-finite on another rank"):
        stop.check(ranks)


def test_stop_policy_checks_before_every_checkpoint_write() -> None:
    net = torch.nn.Linear(2, 2)
    stop = _policy("stop", net)
    ranks = _Ranks([])
    stop.on_train_batch_start(ranks, net, None, 3)
    stop.on_before_backward(ranks, net, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written before it"):
        stop.on_save_checkpoint(ranks, net, {})
    assert stop.last_saved_step is None

    stop.on_load_checkpoint(ranks, net, {"global_step": 40})  # a resumed run names its checkpoint's step
    ranks.checkpoint_callbacks = [SimpleNamespace(last_model_path="run/checkpoints/last.ckpt")]
    stop.on_before_backward(ranks, net, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint: run/checkpoints/last.ckpt \(step 40\)"):
        stop.on_train_epoch_end(ranks, net)


def test_skip_policy_restores_batchnorm_statistics() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    policy = _policy("skip", net)
    policy.on_train_batch_start(_Ranks([]), net, None, 0)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    loss = net(torch.full((2, 1, 5, 5), float("nan"))).mean()
    assert net[1].running_mean.isnan().all()  # the NaN batch poisoned the statistics
    policy.on_before_backward(_Ranks([]), net, loss)
    loss.backward()  # BatchNorm's backward reads the statistics it saved: they are restored only after it
    policy.on_after_backward(_Ranks([]), net)
    assert policy.skipped == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_unknown_policy_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match="'stop' or 'skip', got 'ignore'"):
        _policy("ignore", torch.nn.Linear(1, 1))


@pytest.mark.slow
def test_nan_on_one_ddp_rank_is_skipped_by_both_without_hanging(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        cli_command(*SHORT_FIT, "--trainer.default_root_dir", str(tmp_path), "--model.nonfinite_loss", "skip",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.net.norm", "groupnorm", *NAN_AT_7, "--trainer.callbacks.rank=1"),
        env=fault_env(MASTER_PORT=str(port)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "skipped training step 7 (epoch 0, batch 7): non-finite loss (finite here" in result.stderr  # rank 0
    assert last_metric(tmp_path / "metrics.csv", "train/nonfinite_skipped") == 1.0
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["NonFiniteLossPolicy"]["skipped"] == 1
    assert saved["resnet_lit_rank_states"]["world_size"] == 2 and len(saved["resnet_lit_rank_states"]["ranks"]) == 2


# --- corrupt images -----------------------------------------------------------------------------------------
def _folder_with_a_corrupt_jpeg(root: Path) -> Path:
    write_image_folder(root, classes=("cat", "dog"), per_class=8, size=16, splits=("train", "val"))
    bad = root / "train" / "dog" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    return bad


def _folder_fit(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--data", "resnet_lit.data.ImageFolderDataModule", "--data.root", str(root),
            "--data.transform_style", "cifar", "--data.image_size", "16", "--data.batch_size", "4",
            "--model.arch", "resnet20", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(run_dir), *QUIET, *extra]  # fmt: skip


def test_corrupt_jpeg_stops_with_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _folder_with_a_corrupt_jpeg(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:  # through a DataLoader worker, which wraps the error
        main(_folder_fit(tmp_path / "data", tmp_path / "run", "--data.num_workers", "1"))
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: cannot decode image file") and str(bad) in message
    assert "skip_corrupt: true" in message and "\n" not in message


def test_skip_corrupt_replaces_counts_logs_and_summarises(tmp_path: Path) -> None:
    bad = _folder_with_a_corrupt_jpeg(tmp_path / "data")
    with pytest.warns(UserWarning) as warned:
        cli = ResNetLitCLI(args=_folder_fit(tmp_path / "data", tmp_path / "run", "--data.skip_corrupt", "true"))
    assert cli.trainer.global_step == 4  # 16 images, batches of 4: full batches despite the bad file
    assert cli.datamodule.corrupt_skipped == 1
    assert last_metric(tmp_path / "run" / "metrics.csv", "data/corrupt_skipped") == 1.0
    messages = [str(w.message) for w in warned]
    assert any(str(bad) in m and "replaced undecodable image file" in m for m in messages), messages
    assert any("1 read(s) of corrupt images were replaced" in m for m in messages), messages


# --- dataset layout errors during fit, config errors before data loading ----------------------------------
@pytest.mark.parametrize(
    ("layout", "needle"),
    [
        ("empty-class", "train/dog' has no image files"),
        ("val-classes-differ", "missing ['dog'], extra ['cow']"),
        ("missing-root", "does not exist; set data.root"),
    ],
)
def test_dataset_layout_errors_are_one_line_and_non_zero(
    tmp_path: Path, layout: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    if layout != "missing-root":
        write_image_folder(root, classes=("cat",), per_class=4, size=16, splits=("train", "val"))
        if layout == "empty-class":
            (root / "train" / "dog").mkdir()
        else:
            write_image_folder(root, classes=("dog",), per_class=4, size=16, splits=("train",))
            write_image_folder(root, classes=("cow",), per_class=4, size=16, splits=("val",))
    with pytest.raises(SystemExit) as exit_info:
        main(_folder_fit(root, tmp_path / "run"))
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: ") and needle in message and "\n" not in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.net.block", "bottlenekc"), ("model.net.stem", "deeep"), ("model.net.shortcut", "conv_bm")],
)
def test_bad_registry_names_fail_before_data_loading(
    tmp_path: Path, key: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    write_image_folder(root, classes=("cat",), per_class=2, size=16)
    (root / "train" / "dog").mkdir()  # loading the data would fail on this empty class folder instead
    with pytest.raises(SystemExit) as exit_info:
        main(_folder_fit(root, tmp_path / "run", f"--{key}", value))
    message = _exit_message(exit_info, capsys)
    assert value in message and "has no image files" not in message


def test_bad_policy_name_is_a_parse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.nonfinite_loss", "ignore"])
    assert "model.nonfinite_loss" in _exit_message(exit_info, capsys)
