"""The model zoo's user-facing behaviour: torchvision equivalence, published sizes, overrides and errors."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import resnet_lit
from resnet_lit import create_model, list_models, load_torchvision_weights
from resnet_lit.models import DropPath


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def blocks_of(model: nn.Module) -> list[resnet_lit.ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, resnet_lit.ResidualBlock)]


def shortcuts_of(model: nn.Module) -> list[nn.Module]:
    return [block.shortcut for block in blocks_of(model)]


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-default running stats and affine parameters (scaled to keep outputs O(1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.6 + 0.2)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


# --------------------------------------------------------------------------- torchvision equivalence

TORCHVISION_NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_matches_torchvision_params_and_outputs(name: str) -> None:
    torch.manual_seed(0)
    ours = create_model(name)
    theirs = getattr(tvm, name)()
    assert n_params(ours) == n_params(theirs)

    randomize_norm_stats(theirs)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        before = ours(x)
        assert load_torchvision_weights(ours, theirs.state_dict()) is ours
        got = ours(x)
    assert got.shape == expected.shape == (2, 1000)
    # The comparison is meaningful: loading changed the output, which is not near zero.
    assert (before - expected).abs().max().item() > 1e-2
    assert expected.abs().max().item() > 1e-2
    assert (got - expected).abs().max().item() < 1e-5


def test_torchvision_weights_of_another_depth_are_rejected_naming_keys() -> None:
    ours = create_model("resnet34")
    with pytest.raises(ValueError, match="missing keys") as excinfo:
        load_torchvision_weights(ours, tvm.resnet18().state_dict())
    assert "stages.0.2.conv1.weight" in str(excinfo.value)


def test_torchvision_weights_of_a_deeper_net_are_rejected_as_unexpected() -> None:
    ours = create_model("resnet18")
    with pytest.raises(ValueError, match="unexpected keys") as excinfo:
        load_torchvision_weights(ours, tvm.resnet34().state_dict())
    assert "stages.0.2.conv1.weight" in str(excinfo.value)


def test_torchvision_weights_with_a_removed_key_are_rejected() -> None:
    ours = create_model("resnet18")
    state = tvm.resnet18().state_dict()
    del state["layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match="missing keys") as excinfo:
        load_torchvision_weights(ours, state)
    assert "stages.1.0.shortcut.bn.running_var" in str(excinfo.value)


def test_torchvision_weights_with_wrong_shapes_are_rejected() -> None:
    ours = create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"head\.fc\.weight"):
        load_torchvision_weights(ours, tvm.resnet18().state_dict())


# --------------------------------------------------------------------------- CIFAR family and variants

CIFAR_PARAMS = {
    # name: (exact count, published figure in millions, digits it is published with)
    "resnet20": (269_722, 0.27, 2),
    "resnet32": (464_154, 0.46, 2),
    "resnet44": (658_586, 0.66, 2),
    "resnet56": (853_018, 0.85, 2),
    "resnet110": (1_727_962, 1.7, 1),
}


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_resnets_have_published_sizes_and_identity_pad_shortcuts(name: str) -> None:
    exact, published, digits = CIFAR_PARAMS[name]
    model = create_model(name)
    assert n_params(model) == exact
    assert round(exact / 1e6, digits) == published
    # Option A shortcuts: the two shape-changing shortcuts exist and have no parameters.
    changing = [s for s in shortcuts_of(model) if not isinstance(s, nn.Identity)]
    assert len(changing) == 2
    assert all(n_params(s) == 0 for s in shortcuts_of(model))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_with_projection_shortcuts() -> None:
    model = create_model("resnet20", shortcut="conv_bn")
    changing = [s for s in shortcuts_of(model) if not isinstance(s, nn.Identity)]
    assert len(changing) == 2
    # 1x1 conv + BN for 16->32 and 32->64.
    assert n_params(model) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_cifar_has_a_3x3_stem_without_maxpool() -> None:
    model = create_model("resnet18_cifar")
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.kernel_size == (3, 3)
    assert first_conv.stride == (1, 1)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert model.forward_features(x).shape == (2, 512, 4, 4)
        assert model(x).shape == (2, 10)


def test_resnet18_d2l_takes_one_channel_and_uses_biased_conv_shortcuts() -> None:
    model = create_model("resnet18_d2l")
    projections = [s for s in shortcuts_of(model) if not isinstance(s, nn.Identity)]
    assert len(projections) == 3
    for shortcut in projections:
        convs = [m for m in shortcut.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 1
        assert convs[0].bias is not None
        assert not any(isinstance(m, nn.BatchNorm2d) for m in shortcut.modules())
    with torch.no_grad():
        assert model(torch.randn(2, 1, 96, 96)).shape == (2, 10)


def test_seresnet50_size() -> None:
    model = create_model("seresnet50")
    assert round(n_params(model) / 1e6, 2) == 28.09
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_seresnet20_forward() -> None:
    model = create_model("seresnet20")
    assert n_params(model) > n_params(create_model("resnet20"))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- stems, shortcuts, overrides

SMALL = {"layers": (1, 1, 1, 1), "num_classes": 7}


@pytest.mark.parametrize(
    ("stem", "size", "final_side"),
    [("imagenet", 64, 2), ("cifar", 32, 4), ("deep", 64, 2)],
)
def test_every_stem_builds_and_forwards(stem: str, size: int, final_side: int) -> None:
    model = create_model("resnet18", stem=stem, **SMALL)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 512, final_side, final_side)
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("shortcut", ["identity_pad", "conv", "conv_bn", "avgpool_conv_bn"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_every_shortcut_builds_and_forwards(shortcut: str, block: str) -> None:
    model = create_model("resnet18", shortcut=shortcut, block=block, **SMALL)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    projection_params = sum(n_params(s) for s in shortcuts_of(model))
    if shortcut == "identity_pad":
        assert projection_params == 0
    else:
        assert projection_params > 0


def test_avgpool_shortcut_handles_odd_feature_maps() -> None:
    model = create_model("resnet50d", layers=(1, 1, 1, 1), num_classes=3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 72)).shape == (1, 3)


def test_block_per_stage_list() -> None:
    model = create_model("resnet18", block=["basic", "bottleneck", "basic", "bottleneck"], **SMALL)
    kinds = [type(stage[0]) for stage in model.stages]
    assert kinds == [resnet_lit.BasicBlock, resnet_lit.Bottleneck, resnet_lit.BasicBlock, resnet_lit.Bottleneck]
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_layers_widths_strides_in_channels_num_classes_overrides() -> None:
    model = create_model(
        "resnet20", layers=(1, 2), widths=(8, 24), strides=(2, 2), stem_width=8, in_channels=5, num_classes=3
    )
    assert [len(stage) for stage in model.stages] == [1, 2]
    with torch.no_grad():
        x = torch.randn(2, 5, 32, 32)
        assert model.forward_features(x).shape == (2, 24, 8, 8)
        assert model(x).shape == (2, 3)


def test_groups_and_width_per_group_overrides() -> None:
    model = create_model("resnet50", groups=8, width_per_group=8, layers=(1, 1, 1, 1), num_classes=5)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 8]
    assert len(grouped) == 4
    # First stage: int(64 * 8 / 64) * 8 = 64 channels in the grouped 3x3.
    assert grouped[0].out_channels == 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_norm_and_act_overrides() -> None:
    model = create_model("resnet20", norm="groupnorm", act="silu")
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()  # in-place activations must not break autograd
    assert out.shape == (2, 10)


def test_drop_path_rates_increase_linearly_per_block() -> None:
    model = create_model("resnet20", drop_path=0.2)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 9
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx(torch.linspace(0, 0.2, 9).tolist())


def test_drop_path_is_a_no_op_in_eval_mode() -> None:
    torch.manual_seed(0)
    with_drop = create_model("resnet20", drop_path=0.5)
    randomize_norm_stats(with_drop)
    plain = create_model("resnet20")
    plain.load_state_dict(with_drop.state_dict())
    with_drop.eval()
    plain.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_drop(x), plain(x), rtol=0, atol=0)


def test_drop_path_drops_some_samples_residual_in_train_mode() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", drop_path=0.5)
    block = model.stages[-1][-1]  # the last block has the full rate
    assert isinstance(block.shortcut, nn.Identity)
    block.train()
    x = torch.rand(64, 64, 8, 8)
    with torch.no_grad():
        out = block(x)
    # A dropped sample is just act(shortcut(x)) = relu(x) = x; a kept one is not.
    dropped = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert any(dropped)
    assert not all(dropped)
    block.eval()
    with torch.no_grad():
        out = block(x)
    assert not any(torch.equal(out[i], x[i]) for i in range(len(x)))


@pytest.mark.parametrize(
    ("name", "overrides", "size"),
    [
        ("resnet18", {"layers": (2, 2, 1, 1)}, 64),
        ("resnet50", {"layers": (2, 2, 1, 1)}, 64),
        ("resnet20", {}, 32),
        ("seresnet20", {}, 32),
    ],
)
def test_zero_init_residual_makes_identity_blocks_start_as_identity(name: str, overrides: dict, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True, **overrides)
    model.eval()
    identity_blocks = [b for b in blocks_of(model) if isinstance(b.shortcut, nn.Identity)]
    assert identity_blocks
    with torch.no_grad():
        for block in identity_blocks:
            x = torch.rand(2, block.in_channels, 8, 8)
            torch.testing.assert_close(block(x), x, rtol=0, atol=0)
        # Without the option the blocks do change their input.
        other = create_model(name, **overrides).eval()
        block = next(b for b in blocks_of(other) if isinstance(b.shortcut, nn.Identity))
        x = torch.rand(2, block.in_channels, 8, 8)
        assert not torch.equal(block(x), x)
    assert model(torch.randn(1, 3, size, size)).shape[0] == 1


def test_zero_init_residual_with_a_norm_without_weights_is_a_clear_error() -> None:
    with pytest.raises(NotImplementedError, match="zero_init"):
        create_model("resnet20", norm="identity", zero_init_residual=True)


# --------------------------------------------------------------------------- errors and listing


@pytest.mark.parametrize("typo", ["resnet5", "resnt50"])
def test_unknown_model_suggests_close_matches(typo: str) -> None:
    with pytest.raises(ValueError, match=rf"Unknown model '{typo}'\. Did you mean: [^?]*\bresnet50\b"):
        create_model(typo)


def test_unknown_block_lists_valid_choices() -> None:
    with pytest.raises(ValueError, match="Unknown block 'basik'") as excinfo:
        create_model("resnet18", block="basik")
    message = str(excinfo.value)
    for choice in ("basic", "bottleneck", "se_basic", "se_bottleneck"):
        assert choice in message


@pytest.mark.parametrize(
    ("key", "value"), [("stem", "tiny"), ("shortcut", "nope"), ("norm", "batchnrm"), ("act", "relu6")]
)
def test_unknown_part_names_are_clear(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"Unknown .*'{value}'"):
        create_model("resnet18", **{key: value})


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown model override.*'depth'"):
        create_model("resnet18", depth=18)


@pytest.mark.parametrize(
    "overrides",
    [{"layers": (2, 2, 2)}, {"widths": (64, 128)}, {"strides": (1, 2, 2, 2, 2)}],
)
def test_mismatched_stage_lists_are_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError, match="layers, widths and strides must have one entry per stage"):
        create_model("resnet18", **overrides)


def test_block_list_of_the_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="block lists 2 entries but there are 4 stages"):
        create_model("resnet18", block=["basic", "basic"])


def test_stride_that_does_not_fit_the_image_is_named() -> None:
    with pytest.raises(ValueError, match=r"stage 3 has stride 2 .*image_size=8"):
        create_model("resnet18", image_size=8)
    # The same net fits a 224 image, and a CIFAR net fits 32.
    create_model("resnet18", image_size=224, layers=(1, 1, 1, 1))
    create_model("resnet20", image_size=32)


def test_identity_pad_cannot_reduce_channels() -> None:
    with pytest.raises(ValueError, match=r"identity_pad.*cannot reduce channels \(16 -> 8\)"):
        create_model("resnet20", widths=(16, 8, 64))


def test_basic_block_rejects_groups() -> None:
    with pytest.raises(ValueError, match=r"block 'basic' supports only groups=1.*bottleneck"):
        create_model("resnet18", groups=2)


@pytest.mark.parametrize("drop_path", [-0.1, 1.0])
def test_drop_path_out_of_range_is_rejected(drop_path: float) -> None:
    with pytest.raises(ValueError, match="drop_path must be in"):
        create_model("resnet20", drop_path=drop_path)


def test_list_models_wildcards() -> None:
    names = list_models("resnet*")
    assert names == sorted(names)
    assert all(n.startswith("resnet") for n in names)
    expected = {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet20", "resnet32", "resnet44",
        "resnet56", "resnet110", "resnet18_cifar", "resnet18_d2l", "resnet50d",
    }  # fmt: skip
    assert expected <= set(names)
    assert "seresnet50" not in names
    assert "wide_resnet50_2" not in names
    assert list_models("wide*") == ["wide_resnet101_2", "wide_resnet50_2"]
    assert set(TORCHVISION_NAMES) | {"seresnet50", "seresnet20"} <= set(list_models())
    assert list_models("no_such_*") == []
