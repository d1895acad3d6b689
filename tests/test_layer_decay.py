"""`model.layer_decay`: each block's lr is decay ** (distance from the head), read from the ResNet's structure."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lr_recorder import recorded_lrs
from resnet_lit import NetworkConfig, ResidualBlock, ResNetClassifier
from resnet_lit.cli import main
from resnet_lit.errors import ResNetLitError
from resnet_lit.optim import WarmupCosineLR, rescale_restored_lr
from threads import one_intra_op_thread

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")

DECAY = 0.7


class PlainBlock(ResidualBlock):
    """A user block unknown to the package: one 3x3 convolution, a norm and a learnable scale."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm_layer: Any = nn.BatchNorm2d,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn = norm_layer(channels)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def residual(self, x: Tensor) -> Tensor:
        return self.scale * self.bn(self.conv(x))


def not_a_resnet(num_classes: int = 10, in_channels: int = 3, **_: Any) -> nn.Module:
    """A model factory building something other than a resnet_lit ResNet."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


def fake_trainer(batch_size: int = 64) -> SimpleNamespace:
    return SimpleNamespace(world_size=1, accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=batch_size),
                           estimated_stepping_batches=100, max_epochs=10, max_steps=-1)  # fmt: skip


def expected_distance(name: str, num_blocks: int, blocks_per_stage: list[int]) -> int:
    """The distance from the head by the parameter's name: head 0, last block 1, ..., stem num_blocks + 1."""
    parts = name.split(".")
    if parts[0] == "head":
        return 0
    if parts[0] == "stem":
        return num_blocks + 1
    assert parts[0] == "stages", name
    flat = sum(blocks_per_stage[: int(parts[1])]) + int(parts[2])
    return num_blocks - flat


def build(net: NetworkConfig | None = None, exempt: bool = True, **kwargs: Any) -> ResNetClassifier:
    return ResNetClassifier(arch="resnet20", net=net, layer_decay=DECAY, no_weight_decay_on_norm_and_bias=exempt,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
                            **kwargs)  # fmt: skip


def assert_groups_follow_the_formula(module: ResNetClassifier, optimizer: torch.optim.Optimizer, lr: float) -> None:
    blocks_per_stage = [len(stage) for stage in module.net.stages]
    num_blocks = sum(blocks_per_stage)
    by_param = {id(p): name for name, p in module.net.named_parameters()}
    seen: list[str] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = by_param[id(param)]
            seen.append(name)
            distance = expected_distance(name, num_blocks, blocks_per_stage)
            assert group["lr"] == pytest.approx(lr * DECAY**distance), name
    assert sorted(seen) == sorted(by_param.values())  # every parameter, once
    distances = {expected_distance(name, num_blocks, blocks_per_stage) for name in by_param.values()}
    assert distances == set(range(num_blocks + 2))  # the head, every block and the stem


@pytest.mark.parametrize("exempt", [True, False], ids=["norm_bias_exempt", "all_decayed"])
def test_builtin_blocks_get_decay_to_the_distance_from_the_head(exempt: bool) -> None:
    module = build(exempt=exempt)
    module.trainer = fake_trainer()
    optimizer = module.configure_optimizers()
    assert_groups_follow_the_formula(module, optimizer, 0.1)
    for group in optimizer.param_groups:  # the weight-decay split still holds within every block
        if exempt and any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 1e-4
    assert module.configured_lrs == [group["lr"] for group in optimizer.param_groups]


def test_a_user_block_gets_its_decay_without_a_matcher() -> None:
    module = build(NetworkConfig(block=f"{__name__}.PlainBlock", layers=[2, 1, 1]))
    assert isinstance(module.net.stages[0][0], PlainBlock)
    module.trainer = fake_trainer()
    assert_groups_follow_the_formula(module, module.configure_optimizers(), 0.1)


def test_batch_scaling_and_the_schedule_scale_all_groups_alike() -> None:
    module = build(lr_reference_batch=32, lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=4))
    module.trainer = fake_trainer(batch_size=64)  # factor 2
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    peak = [group["initial_lr"] for group in optimizer.param_groups]
    assert_groups_follow_the_formula(module, SimpleNamespace(param_groups=[
        {**g, "lr": g["initial_lr"]} for g in optimizer.param_groups]), 0.2)  # fmt: skip
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        factor = optimizer.param_groups[0]["lr"] / peak[0]
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([lr * factor for lr in peak])

    # A resume with another configured lr rescales every group by the same factor and keeps the decay.
    restored = list(module.configured_lrs)
    before = [group["lr"] for group in optimizer.param_groups]
    message = rescale_restored_lr(optimizer, [scheduler], restored, [lr / 2 for lr in restored])
    assert message and "scaled by 0.5" in message
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([lr / 2 for lr in before])
    assert scheduler.base_lrs == pytest.approx([lr / 2 for lr in peak])


@pytest.mark.usefixtures("one_thread")
def test_a_resume_with_another_lr_rescales_every_group_alike(tmp_path: Path) -> None:
    args = ["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches",
            "0", "--trainer.max_steps", "3", "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.save_top_k", "-1", "--model.layer_decay", "0.5",
            "--data.init_args.batch_size", "32"]  # fmt: skip
    uninterrupted = recorded_lrs([*args, "--trainer.default_root_dir", str(tmp_path / "a")])
    assert len(uninterrupted[0]) == 2 * (9 + 2)  # resnet20: head, 9 blocks, stem; decayed and exempt each
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch000-step1.ckpt", tmp_path / "b" / "checkpoints" / "last.ckpt")
    resumed = recorded_lrs([*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", "last",
                            "--model.optimizer.init_args.lr", "0.05"])  # fmt: skip
    assert sorted(resumed) == [1, 2]
    for step, lrs in resumed.items():
        assert lrs == pytest.approx([lr / 2 for lr in uninterrupted[step]], rel=1e-12)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny model: one intra-op thread is as fast, and does not stall when another process holds a core."""
    with one_intra_op_thread():
        yield


def test_layer_decay_off_is_one_group_as_before() -> None:
    module = ResNetClassifier(arch="resnet20", layer_decay=None)
    module.trainer = fake_trainer()
    assert len(module.configure_optimizers().param_groups) == 1


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_decay_outside_0_1_is_refused(value: float) -> None:
    with pytest.raises(ResNetLitError, match=rf"model.layer_decay must be in \(0, 1\].*got {value}"):
        ResNetClassifier(arch="resnet20", layer_decay=value)


def test_another_network_with_layer_decay_is_one_line_naming_the_arch() -> None:
    arch = f"{__name__}.not_a_resnet"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.arch", arch, "--model.layer_decay", "0.7", "--data", "SyntheticDataModule",
              "--trainer.max_steps", "1", "--trainer.logger", "false"])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: model.layer_decay") and "\n" not in message
    assert f"model.arch {arch!r} builds a Sequential" in message
