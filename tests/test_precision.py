"""Mixed precision: bf16-mixed trains on CPU to fp32's accuracy; 16-mixed is accepted; GPU recipes use bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from resnet_lit.cli import ResNetLitCLI

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
EPOCHS = 4  # the quickstart schedule compressed into 4 epochs (76 steps): ~0.99 val/acc already
# Measured on the 270 validation digits: fp32 0.9963, bf16-mixed 0.9889 (2 images apart). 0.02 = 5 images.
MARGIN = 0.02


def train_digits(precision: str, root: Path) -> tuple[float, set[torch.dtype]]:
    """Quickstart ResNet-20 on the digits; returns val/acc and the dtypes of the network's outputs in training."""
    cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.precision", precision,
                             "--trainer.max_epochs", str(EPOCHS), "--trainer.default_root_dir", str(root), *QUIET],
                       run=False)  # fmt: skip
    dtypes: set[torch.dtype] = set()
    cli.model.net.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype) if module.training else None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.trainer.callback_metrics["val/acc"].item(), dtypes


@pytest.fixture
def one_thread():
    """One intra-op thread: the 8x8 model gains nothing from two, and a 2-thread OpenMP loop slows down ~20x when
    another process holds one of the 2 cores (every tiny op waits at a barrier for the descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_bf16_mixed_reaches_fp32_accuracy_on_digits(tmp_path: Path) -> None:
    fp32_acc, fp32_dtypes = train_digits("32-true", tmp_path / "fp32")
    bf16_acc, bf16_dtypes = train_digits("bf16-mixed", tmp_path / "bf16")
    assert fp32_dtypes == {torch.float32}
    assert bf16_dtypes == {torch.bfloat16}  # autocast really ran the network in bfloat16
    assert fp32_acc >= 0.97
    assert abs(bf16_acc - fp32_acc) <= MARGIN, (fp32_acc, bf16_acc)


def test_16_mixed_is_a_valid_setting_and_becomes_bf16_on_cpu(tmp_path: Path) -> None:
    # fp16 autocast with a GradScaler is a GPU feature; on CPU Lightning substitutes bf16-mixed, with a warning.
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        cli = ResNetLitCLI(args=["--config", QUICKSTART, "--trainer.precision", "16-mixed",
                                 "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"


def _recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


@pytest.mark.parametrize("name", ["r50.yaml", "cifar10_resnet18.yaml"])
def test_gpu_recipes_default_to_bf16_mixed_and_channels_last(name: str) -> None:
    recipe = _recipe(name)
    assert recipe["trainer"]["precision"] == "bf16-mixed"
    assert recipe["model"]["channels_last"] is True
    assert recipe["trainer"]["devices"] == "auto"  # scales to every GPU of the node unchanged
