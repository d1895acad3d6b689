"""Pre-activation ResNets (He et al. 2016b) and plain networks (`net.residual: false`)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from resnet_lit import ResidualBlock, create_model, list_models
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.fault_tolerance.checkpoint_io import load_network_weights
from resnet_lit.finetuning.freezing import StageFreezer
from resnet_lit.models import ModelConfigError, PreActBasicBlock, PreActBottleneck
from resnet_lit.models.shortcuts import PadShortcut, ProjectionShortcut
from resnet_lit.optim import layer_distances
from threads import one_intra_op_thread

PREACT_NAMES = [
    "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
    "preact_resnet110", "preact_resnet164", "preact_resnet1001",
]  # fmt: skip
PLAIN_NAMES = ["plain20", "plain32", "plain44", "plain56", "plain110"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Batches of two small images: one intra-op thread is as fast, and does not stall on a shared core."""
    with one_intra_op_thread():
        yield


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def blocks_of(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def projections_of(model: nn.Module) -> list[nn.Module]:
    return [b.shortcut for b in blocks_of(model) if b.shortcut is not None and not isinstance(b.shortcut, nn.Identity)]


# --------------------------------------------------------------------------- sizes and layouts

# name: (exact count, the paper's figure in millions (He et al. 2016b, tables 2 and 3), projecting blocks)
CIFAR_PREACT = {
    "preact_resnet110": (1_730_522, 1.7, 2),
    "preact_resnet164": (1_703_258, 1.7, 3),  # the first block widens 16 -> 64 at stride 1
    "preact_resnet1001": (10_327_706, 10.2, 3),
}


@pytest.mark.parametrize("name", sorted(CIFAR_PREACT))
def test_cifar_preact_resnets_have_the_papers_sizes_and_project_only_where_the_shape_changes(name: str) -> None:
    exact, published_millions, projecting = CIFAR_PREACT[name]
    model = create_model(name)
    assert n_params(model) == exact
    assert abs(exact / (published_millions * 1e6) - 1) < 0.05
    projections = projections_of(model)
    assert len(projections) == projecting
    for shortcut in projections:  # a bias-free 1x1 convolution and nothing else (the paper's code)
        layers = [m for m in shortcut.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        assert len(layers) == 1 and layers[0].kernel_size == (1, 1) and layers[0].bias is None
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[1:] == (
        64 if name == "preact_resnet110" else 256, 8, 8,
    )  # fmt: skip


# timm's pre-activation ResNetV2 of the same layout has the same parameters (resnetv2_18 ... resnetv2_101).
IMAGENET_PREACT = {
    "preact_resnet18": 11_687_720, "preact_resnet34": 21_795_880, "preact_resnet50": 25_549_352,
    "preact_resnet101": 44_541_480, "preact_resnet152": 60_185_128,
}  # fmt: skip


def timm_to_ours(key: str) -> str:
    """A timm ResNetV2 state-dict key as this package names it."""
    if key.startswith("norm."):
        return f"head.{key}"
    key = key.replace(".blocks.", ".").replace(".downsample.conv.", ".shortcut.conv.")
    for i in (1, 2, 3):
        key = key.replace(f".norm{i}.", f".bn{i}.")
    return key


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_preact_resnets_compute_what_timms_resnetv2_computes(depth: int) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = timm.create_model(f"resnetv2_{depth}", pretrained=False).eval()
    ours = create_model(f"preact_resnet{depth}").eval()
    assert n_params(ours) == n_params(theirs) == IMAGENET_PREACT[f"preact_resnet{depth}"]
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, value in theirs.state_dict().items():
        if key.endswith(("running_var", "norm1.weight", "norm2.weight", "norm3.weight")) or key == "norm.weight":
            value = torch.rand(value.shape, generator=gen) * 0.5 + 0.5  # non-default statistics and scales
        elif key.endswith(("running_mean", "bias")):
            value = torch.randn(value.shape, generator=gen) * 0.1
        state[key] = value
    theirs.load_state_dict(state)
    ours.load_state_dict({timm_to_ours(k): v.flatten(1) if k == "head.fc.weight" else v for k, v in state.items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1e-2


# --------------------------------------------------------------------------- every pre-activation model


@pytest.mark.parametrize("name", PREACT_NAMES)
def test_every_preact_model_forwards_backwards_converts_to_syncbn_and_describes(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    params = n_params(model)
    assert params == IMAGENET_PREACT.get(name, CIFAR_PREACT.get(name, (params,))[0])
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.head.fc.out_features)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.head.norm.weight.grad.abs().sum() > 0

    keys = list(model.state_dict())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == norms
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert isinstance(synced.head.norm, nn.SyncBatchNorm)
    assert list(synced.state_dict()) == keys

    main(["describe", name, "--image-size", "32"])
    out_text = capsys.readouterr().out
    assert out_text.startswith(f"{name} @ 3x32x32")
    assert out_text.splitlines()[-2].split()[:2] == ["total", f"{params:,}"]


def _write_config(tmp_path: Path, arch: str) -> Path:
    config = tmp_path / "preact.yaml"
    config.write_text(
        textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          fast_dev_run: 1
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {tmp_path / "run"}
        checkpoint:
          save_last: false          # keeps the test quick: no 0.5 GB last.ckpt of preact_resnet152
        model:
          arch: {arch}
        data:
          class_path: resnet_lit.data.SyntheticDataModule
          init_args:
            num_classes: 3
            image_size: 32
            num_samples: 2
            num_val_samples: 2
            num_test_samples: 2
            batch_size: 2
        """)
    )
    return config


@pytest.mark.parametrize("name", PREACT_NAMES)
def test_every_preact_model_fits_from_yaml(name: str, tmp_path: Path) -> None:
    cli = ResNetLitCLI(args=["fit", "--config", str(_write_config(tmp_path, name))])
    assert cli.trainer.global_step == 1
    net = cli.model.net
    assert net.head.fc.out_features == 3
    assert net.head.norm.num_batches_tracked == 1  # the final norm ran in the training step
    assert net.stages[0][0].bn1.num_batches_tracked == 1
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# --------------------------------------------------------------------------- pre-activation structure


def test_a_projecting_block_feeds_its_shortcut_the_preactivated_input() -> None:
    torch.manual_seed(0)
    model = create_model("preact_resnet110", layers=(1, 2, 1))
    block = model.stages[1][0]  # 16 -> 32 channels, stride 2
    assert isinstance(block, PreActBasicBlock) and isinstance(block.shortcut, ProjectionShortcut)
    seen: dict[str, Tensor] = {}
    block.act1.register_forward_hook(lambda _m, _inp, out: seen.__setitem__("preact", out))
    block.conv1.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("branch", inp[0]))
    block.shortcut.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("shortcut", inp[0]))
    x = torch.randn(2, 16, 8, 8)
    block.train()
    out = block(x)
    assert seen["branch"] is seen["preact"] and seen["shortcut"] is seen["preact"]
    assert block.bn1.num_batches_tracked == 1  # computed once, shared
    with torch.no_grad():
        pre = torch.relu(block.bn1.eval()(x))
        block.eval()
        torch.testing.assert_close(block(x), block.residual(x) + block.shortcut.conv(pre), rtol=0, atol=0)
    assert (out < 0).any()  # nothing after the sum

    identity_block = model.stages[1][1]
    assert isinstance(identity_block.shortcut, nn.Identity)
    identity_block.eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(identity_block(x), identity_block.residual(x) + x, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "stem_modules"), [("preact_resnet110", [nn.Conv2d]),
                                                    ("preact_resnet18", [nn.Conv2d, nn.MaxPool2d])])  # fmt: skip
def test_the_preact_stem_is_a_bare_convolution_and_the_head_has_the_final_norm(
    name: str, stem_modules: list[type]
) -> None:
    model = create_model(name).eval()
    assert [type(m) for m in model.stem.children()] == stem_modules
    assert model.stem[0].bias is None
    assert isinstance(model.head.norm, nn.BatchNorm2d) and isinstance(model.head.act, nn.ReLU)
    assert model.head.norm.num_features == model.num_features
    features = torch.randn(2, model.num_features, 3, 3)
    with torch.no_grad():
        expected = model.head.fc(torch.relu(model.head.norm(features)).mean((2, 3)))
        torch.testing.assert_close(model.head(features), expected)


def test_post_activation_networks_keep_their_head_and_state_dict_keys() -> None:
    for name in ("resnet20", "resnet50", "plain20"):
        model = create_model(name)
        assert isinstance(model.head.norm, nn.Identity) and isinstance(model.head.act, nn.Identity)
        assert [k for k in model.state_dict() if k.startswith("head.")] == ["head.fc.weight", "head.fc.bias"]
    assert create_model("plain20").state_dict().keys() == create_model("resnet20").state_dict().keys()


def test_the_final_norm_is_head_for_layer_decay_freezing_and_reinit_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("preact_resnet110", layers=(1, 1, 1))
    distance, head = layer_distances(model)[0]
    assert distance == 0 and head is model.head
    frozen = StageFreezer(model, 3, None, "preact_resnet110").parameters  # every stage
    assert not any(p is model.head.norm.weight or p is model.head.norm.bias for p in frozen)

    with torch.no_grad():
        model.head.norm.weight.uniform_(0.5, 1.5)
        model.head.norm.running_mean.normal_()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    other = create_model("preact_resnet110", layers=(1, 1, 1), num_classes=7)
    load_network_weights(other, str(tmp_path / "net.pt"), reinit_head=True)
    assert torch.equal(other.head.norm.weight, model.head.norm.weight)
    assert torch.equal(other.head.norm.running_mean, model.head.norm.running_mean)


@pytest.mark.parametrize(("cls", "last"), [(PreActBasicBlock, "conv2"), (PreActBottleneck, "conv3")])
def test_preact_blocks_zero_their_last_convolution(cls: type[ResidualBlock], last: str) -> None:
    assert cls.post_activation is False
    block = cls(64, 16 if cls.expansion == 4 else 64).eval()
    block.zero_init_last()
    zeroed = [name for name, p in block.named_parameters() if name.endswith("weight") and not p.any()]
    assert zeroed == [f"{last}.weight"]
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)  # negative inputs pass: no ReLU after the sum


def test_preact_blocks_are_listed_and_models_match_preact_star(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models", "preact*"])
    assert capsys.readouterr().out.split() == sorted(PREACT_NAMES) == list_models("preact*")
    main(["blocks", "preact*"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[:2] for row in rows] == [["preact_basic", "built-in"], ["preact_bottleneck", "built-in"]]


# --------------------------------------------------------------------------- plain networks


class CountAdds(TorchFunctionMode):
    """Counts tensor additions (`+`, `torch.add`, in place or not) in the torch functions it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.adds = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("add", "add_", "__add__", "__iadd__", "__radd__"):
            self.adds += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("plain", "residual"), [("plain20", "resnet20"), ("plain110", "resnet110")])
def test_a_plain_network_has_the_same_layers_without_shortcuts_or_sums(plain: str, residual: str) -> None:
    torch.manual_seed(0)
    model = create_model(plain).eval()
    reference = create_model(residual).eval()
    assert n_params(model) == n_params(reference)
    assert [type(b) for b in blocks_of(model)] == [type(b) for b in blocks_of(reference)]
    assert all(b.shortcut is None for b in blocks_of(model))
    assert not any(isinstance(m, PadShortcut | ProjectionShortcut) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), CountAdds() as plain_adds:
        model(x)
    with torch.no_grad(), CountAdds() as residual_adds:
        reference(x)
    assert plain_adds.adds == 0
    assert residual_adds.adds == len(blocks_of(reference))  # the counter sees the residual sums
    block = model.stages[1][0]
    with torch.no_grad():
        features = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(block(features), torch.relu(block.residual(features)), rtol=0, atol=0)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_plain_networks_are_the_cifar_resnets_without_shortcuts(name: str) -> None:
    model = create_model(name)
    depth = int(name.removeprefix("plain"))
    assert [len(stage) for stage in model.stages] == [(depth - 2) // 6] * 3
    assert n_params(model) == n_params(create_model(f"resnet{depth}"))
    assert all(b.shortcut is None for b in blocks_of(model))
    # `shortcut` only picks the projection type; no projection is built without shortcuts.
    assert n_params(create_model(name, shortcut="conv_bn")) == n_params(model)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("resnet20", {}), ("preact_resnet110", {"layers": (2, 2, 2)}), ("preact_resnet164", {"layers": (2, 2, 2)})],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_init_residual_makes_a_plain_network_forget_its_input_but_not_a_residual_one(
    name: str, overrides: dict, mode: str
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    plain = create_model(name, residual=False, zero_init_residual=True, **overrides).train(mode == "train")
    residual = create_model(name, zero_init_residual=True, **overrides).train(mode == "train")
    with torch.no_grad():
        plain_logits, residual_logits = plain(x), residual(x)
    # The zeroed branches carry nothing forward: the same logits for both inputs.
    torch.testing.assert_close(plain_logits[0], plain_logits[1], rtol=0, atol=0)
    assert not torch.allclose(residual_logits[0], residual_logits[1])


def test_drop_path_on_a_plain_network_is_refused_in_one_line_naming_both_keys(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"^net\.drop_path=0\.1 needs a residual network.*net\.residual"):
        create_model("plain20", drop_path=0.1)
    create_model("plain20", drop_path=0.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.arch", "resnet20", "--model.net.residual", "false", "--model.net.drop_path", "0.1",
              "--data", "SyntheticDataModule", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: net.drop_path=0.1 needs a residual network") and "\n" not in message
    assert "net.residual" in message
    assert not (tmp_path / "run").exists()


def test_net_residual_false_from_the_command_line_builds_a_plain_network() -> None:
    args = ["--model.arch", "preact_resnet110", "--model.net.residual", "false", "--model.net.layers", "[1, 1, 1]",
            "--data", "SyntheticDataModule"]  # fmt: skip
    cli = ResNetLitCLI(args=args, run=False)
    assert cli.model.hparams.net["residual"] is False
    assert all(b.shortcut is None for b in blocks_of(cli.model.net))


def test_a_user_block_forwarding_kwargs_gets_residual_false() -> None:
    class OneConv(ResidualBlock):
        def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs: object) -> None:
            super().__init__(in_channels, channels, stride, **kwargs)
            self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1)

        def residual(self, x: Tensor) -> Tensor:
            return self.conv(x)

    assert all(b.shortcut is None for b in blocks_of(create_model("resnet20", block=OneConv, residual=False)))
    assert any(b.shortcut is not None for b in blocks_of(create_model("resnet20", block=OneConv)))
    with pytest.raises(ModelConfigError, match=r"net\.block_args cannot set residual \(net\.residual\)"):
        create_model("resnet20", block_args={"residual": False})
