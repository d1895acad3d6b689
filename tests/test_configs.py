"""Every shipped recipe parses, prints its config and runs one fast_dev_run step on CPU on generated data."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fakedata import write_fake_cifar10, write_fake_mnist, write_image_folder
from offline_hub import cache_torchvision_weights, offline_torch_home
from resnet_lit.cli import ResNetLitCLI, main

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))
TRAINING_CONFIGS = [c for c in CONFIGS if "data" in (yaml.safe_load(c.read_text()) or {})]


def _data_overrides(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Point the recipe's DataModule at generated data of the right shape; keep batches small."""
    data = yaml.safe_load(config.read_text())["data"]
    class_path = data["class_path"]
    if class_path.endswith("CIFAR10DataModule"):
        write_fake_cifar10(tmp_path, monkeypatch, per_batch=8, num_test=8)
        return ["--data.init_args.data_dir", str(tmp_path), "--data.init_args.batch_size", "4"]
    if class_path.endswith("FashionMNISTDataModule"):
        write_fake_mnist(tmp_path, "FashionMNIST")
        return ["--data.init_args.data_dir", str(tmp_path), "--data.init_args.batch_size", "4"]
    if class_path.endswith("ImageFolderDataModule"):
        size = data["init_args"].get("image_size", 224)
        write_image_folder(tmp_path, classes=("a", "b", "c"), per_class=3, size=size, splits=("train", "val"))
        return ["--data.init_args.root", str(tmp_path), "--data.init_args.batch_size", "2"]
    if class_path.endswith("DigitsDataModule"):
        return []
    raise AssertionError(f"{config.name}: add generated data for {class_path} to this test")


def _prepare_pretrained_weights(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe that starts from a named source finds it in a prepared torch hub cache, with downloads refused."""
    init_from = (yaml.safe_load(config.read_text())["model"] or {}).get("init_from") or ""
    if init_from.startswith("torchvision:"):
        cache_torchvision_weights(offline_torch_home(monkeypatch, tmp_path), init_from)


def _config_id(path: Path) -> str:
    return str(path.relative_to(CONFIGS_DIR))


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_print_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if config not in TRAINING_CONFIGS:
        pytest.skip(f"{config.name} is not a training config")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"] == yaml.safe_load(config.read_text())["model"]["arch"]


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=_config_id)
def test_fast_dev_run_on_cpu(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = _data_overrides(config, tmp_path / "data", monkeypatch)
    _prepare_pretrained_weights(config, tmp_path, monkeypatch)
    cli = ResNetLitCLI(
        args=[
            "fit", "--config", str(config), *overrides,
            "--trainer.fast_dev_run", "true",
            "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.arch == yaml.safe_load(config.read_text())["model"]["arch"]


def test_r50_uses_per_gpu_batchnorm_and_cudnn_autotuning(capsys: pytest.CaptureFixture[str]) -> None:
    """SyncBatchNorm syncs the host in every layer and breaks compile graphs; the recipe it follows does without."""
    config = CONFIGS_DIR / "r50.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["sync_batchnorm"] is False and trainer["benchmark"] is True
    lines = config.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("sync_batchnorm:"))
    comment = " ".join(line.strip() for line in lines[at - 3 : at])
    assert "per GPU" in comment and "#161302" in comment  # when to turn it on, and why not by default


def test_slurm_script_gives_every_srun_task_its_cpus(tmp_path: Path) -> None:
    """Since Slurm 22.05 srun does not inherit --cpus-per-task: the script must pass it on (SRUN_CPUS_PER_TASK)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_srun = bin_dir / "srun"
    fake_srun.write_text(f'#!/bin/sh\nenv > "{tmp_path / "srun.env"}"\necho "$@" > "{tmp_path / "srun.args"}"\n')
    fake_srun.chmod(0o755)
    slurm = {"SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NUM_NODES": "2"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    script = CONFIGS_DIR / "slurm" / "r50.sbatch"
    subprocess.run(["bash", str(script)], env={**env, **slurm, "PATH": f"{bin_dir}:{env['PATH']}"}, check=True,
                   cwd=tmp_path)  # fmt: skip
    seen = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert seen.get("SRUN_CPUS_PER_TASK") == "10"
    assert "--trainer.devices 8" in (tmp_path / "srun.args").read_text()
    text = script.read_text()
    assert "GLOO_SOCKET_IFNAME" in text and "NCCL_SOCKET_IFNAME" in text and "NCCL_DEBUG=INFO" in text


def test_finetune_recipe_starts_from_the_named_weights_frozen_with_an_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fine-tuning recipe loads the cached torchvision weights (head aside), freezes the stem and stage 1 in
    its first epoch, keeps a weight average, and normalises the data as the weights were trained (no warning)."""
    config = CONFIGS_DIR / "finetune_imagefolder.yaml"
    overrides = _data_overrides(config, tmp_path / "data", monkeypatch)
    cache = offline_torch_home(monkeypatch, tmp_path)
    source = torch.load(cache_torchvision_weights(cache, "torchvision:resnet50.IMAGENET1K_V2"), weights_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = ResNetLitCLI(args=["fit", "--config", str(config), *overrides, "--trainer.fast_dev_run", "true",
                                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
                                 "--trainer.enable_progress_bar", "false"])  # fmt: skip
    model = cli.model
    assert not [w for w in record if "was trained with mean" in str(w.message)]
    assert model.pretrained_source.name == "torchvision:resnet50.IMAGENET1K_V2"
    assert model.freezer.frozen_at(0) and not model.freezer.frozen_at(1)
    torch.testing.assert_close(model.net.stem.conv.weight, source["conv1.weight"], rtol=0, atol=0)  # still frozen
    assert model.ema is not None and model.hparams.num_classes == 3 and model.net.head.fc.out_features == 3
