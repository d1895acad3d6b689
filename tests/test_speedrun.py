"""The CIFAR-10 speedrun recipe (issue 16): its `conv_pool` network, the block's protocol, the held-out split of
benchmarks/cifar10_speedrun.py, and a shortened run of the recipe that learns real CIFAR-10 images on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from torch import nn

from fakedata import unpack_cifar_jpegs, write_image_folder
from resnet_lit.models import BLOCKS, ConvPoolBlock, ModelConfigError, create_model, summarize
from resnet_lit.training_cli import network_stride

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar10_speedrun.yaml"
RESNET9 = {"stem": "cifar", "stem_width": 64, "block": "conv_pool", "layers": [1, 1, 1], "strides": [2, 2, 2],
           "widths": [128, 256, 512], "block_args": [{}, {"residual_branch": False}, {}]}  # fmt: skip


def _recipe() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cifar10_speedrun", REPO / "benchmarks" / "cifar10_speedrun.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_recipe_network_has_the_resnet9_layout_at_airbench_widths() -> None:
    model = _recipe()["model"]
    net = create_model(model["arch"], num_classes=10, **model["net"]).eval()
    assert sum(p.numel() for p in net.parameters()) == 2_034_378
    assert [(f["num_chs"], f["reduction"]) for f in net.feature_info] == [(64, 1), (64, 2), (256, 4), (256, 8)]
    assert network_stride(net) == 8
    assert BLOCKS.get("conv_pool") is ConvPoolBlock and BLOCKS.origin("conv_pool") == "built-in"
    assert [stage[0].has_branch for stage in net.stages] == [True, False, True]
    macs = sum(row.macs for row in summarize(net, 32))
    assert macs == 152_766_976
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    resnet9 = create_model("resnet18_cifar", num_classes=10, **RESNET9)
    assert sum(p.numel() for p in resnet9.parameters()) == 6_573_130  # Page's ResNet-9 at 128/256/512


def test_the_recipe_keeps_validation_and_checkpoints_out_of_training_and_has_the_ingredients() -> None:
    recipe = _recipe()
    trainer, model, data = recipe["trainer"], recipe["model"], recipe["data"]["init_args"]
    assert trainer["limit_val_batches"] == 0 and trainer["num_sanity_val_steps"] == 0
    assert recipe["checkpoint"] == {"save_last": False, "save_top_k": 0, "every_n_epochs": 0}
    assert trainer["precision"] == "bf16-mixed" and model["channels_last"] and model["compile"]
    assert data["loader"] == "device" and data["transform_style"] == "cifar" and data["batch_size"] == 512
    assert model["lr_reference_batch"] == data["batch_size"]
    assert model["tta"] == "flip" and model["label_smoothing"] == 0.2


def test_conv_pool_block_pools_the_convolution_and_adds_its_residual_pair() -> None:
    torch.manual_seed(0)
    block = ConvPoolBlock(16, 32, stride=2).eval()
    assert (block.in_channels, block.out_channels, block.stride) == (16, 32, 2)
    assert isinstance(block.shortcut, nn.Identity)  # p(x) already has the output shape: no projection
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        pooled = torch.relu(block.bn(nn.functional.max_pool2d(block.conv(x), 2)))
        torch.testing.assert_close(block.conv_pool(x), pooled, rtol=0, atol=0)
        torch.testing.assert_close(block(x), torch.relu(block.branch(pooled) + pooled), rtol=0, atol=0)
        torch.testing.assert_close(block.residual(x), block.branch(pooled), rtol=0, atol=0)
        assert block(x).shape == (2, 32, 4, 4)


def test_conv_pool_zero_init_last_zeroes_only_the_pairs_last_norm_so_the_block_starts_as_its_conv_pool() -> None:
    block = ConvPoolBlock(16, 32, stride=2).eval()
    block.zero_init_last()
    zeroed = [name for name, p in block.named_parameters() if name.endswith("weight") and not p.any()]
    assert zeroed == ["bn2.weight"]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.conv_pool(x), rtol=0, atol=0)
    net = create_model("resnet18_cifar", zero_init_residual=True, **RESNET9)
    assert [bool(stage[0].bn2.weight.any()) for stage in (net.stages[0], net.stages[2])] == [False, False]


def test_conv_pool_without_residual_branch_is_the_conv_pool_alone() -> None:
    block = ConvPoolBlock(16, 32, stride=2, residual_branch=False, drop_path=0.1).eval()
    assert {name.split(".")[0] for name, _ in block.named_parameters()} == {"conv", "bn"}
    assert block.shortcut is None
    block.zero_init_last()  # nothing to zero
    assert all(p.any() for name, p in block.named_parameters() if name.endswith("weight"))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.conv_pool(x), rtol=0, atol=0)
        assert not block.residual(x).any()


def test_conv_pool_in_a_plain_network_has_no_sum_and_takes_drop_path_only_with_the_pair() -> None:
    plain = ConvPoolBlock(16, 32, stride=2, residual=False).eval()
    assert plain.shortcut is None
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), torch.relu(plain.branch(plain.conv_pool(x))), rtol=0, atol=0)
    assert ConvPoolBlock(16, 32, drop_path=0.2).drop_path.p == 0.2
    net = create_model("resnet18_cifar", drop_path=0.2, **RESNET9)
    assert [stage[0].drop_path.p for stage in net.stages] == pytest.approx([0.0, 0.0, 0.2])  # middle: no pair


def test_a_misspelt_conv_pool_option_names_the_valid_one() -> None:
    with pytest.raises(ModelConfigError, match=r"block 'conv_pool' \(ConvPoolBlock\) has no option\(s\) residual_pair; "
                       r"valid options: residual_branch"):  # fmt: skip
        create_model("resnet18_cifar", **{**RESNET9, "block_args": {"residual_pair": False}})


def test_prepare_holds_out_the_last_files_of_each_class(tmp_path: Path) -> None:
    source = write_image_folder(tmp_path / "source", classes=("a", "b"), per_class=5, size=8)
    root = _benchmark().prepare(tmp_path / "root", source, held_out=2)
    for label in ("a", "b"):
        everything = sorted(p.name for p in (source / "train" / label).iterdir())
        assert sorted(p.name for p in (root / "train" / label).iterdir()) == everything[:3]
        assert sorted(p.name for p in (root / "val" / label).iterdir()) == everything[3:]
    assert json.loads((root / "split.json").read_text())["held_out_per_class"] == 2
    rebuilt = _benchmark().prepare(tmp_path / "root", source, held_out=1)  # another split replaces the folder
    assert len(list((rebuilt / "val" / "a").iterdir())) == 1


def test_a_shortened_recipe_learns_real_cifar10_and_scores_the_held_out_images_once(tmp_path: Path) -> None:
    """The recipe, shortened (compile off, 4 epochs of batch 32 at lr 0.05), on 500 real training JPEGs, scored on
    100 held out."""
    benchmark = _benchmark()
    source = unpack_cifar_jpegs(tmp_path / "source", per_class=60)
    root = benchmark.prepare(tmp_path / "root", source, held_out=10)
    fit_args = ["--trainer.accelerator", "cpu", "--model.compile", "false", "--data.init_args.batch_size", "32",
                "--model.lr_reference_batch", "256", "--data.init_args.num_workers", "0"]  # fmt: skip
    run = benchmark.train_and_score(root, 4, tmp_path / "run", first_steps=2, fit_args=fit_args)
    assert (run["train_images"], run["held_out_images"], run["batch_size"]) == (500, 100, 32)
    assert run["steps"] == 4 * (500 // 32) and run["first_steps"] == 2  # drop_last: 15 steps per epoch
    assert run["accuracy"] >= 0.25, run  # chance is 0.10: 25 of 100 right by chance has p < 1e-5 (it gets 0.40)
    assert run["train_seconds"] > 0 and run["compile_seconds"] >= 0 and run["tta"] == "flip"
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing saved, during training or after
