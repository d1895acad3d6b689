"""Block options from the config (`net.block_args`): checked against the block's signature, then passed to it."""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from resnet_lit import NetworkConfig, ResidualBlock, ResNetClassifier, create_model
from resnet_lit.cli import ResNetLitCLI, main
from resnet_lit.data import SyntheticDataModule
from resnet_lit.models import ModelConfigError, SEBasicBlock, SEBottleneck, block_options
from resnet_lit.models.block_options import BUILDER_ARGS

GATE_MODULE = "rltest_gatemod"
GATE_SOURCE = '''
import torch
from torch import nn

from resnet_lit import ResidualBlock


class GatedBlock(ResidualBlock):
    """A 3x3 convolution and a norm, scaled by a learnable gate that starts at `gate_init`."""

    def __init__(self, in_channels, channels, stride=1, *, gate_init: float = 1.0, norm_layer=nn.BatchNorm2d,
                 **kwargs):
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn = norm_layer(channels)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def residual(self, x):
        return self.gate * self.bn(self.conv(x))

    def zero_init_last(self):
        nn.init.zeros_(self.gate)
'''
MISSPELT = "block '{}' (GatedBlock) has no option(s) gate_int; valid options: gate_init"


@pytest.fixture
def gate_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable user module with `GatedBlock`; returns the block's dotted path."""
    (tmp_path / f"{GATE_MODULE}.py").write_text(GATE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, GATE_MODULE, raising=False)
    return f"{GATE_MODULE}.GatedBlock"


def se_widths(model: nn.Module) -> list[int]:
    """The hidden width of each stage's first SE gate (0 for a stage without SE)."""
    return [stage[0].se.fc1.out_channels if hasattr(stage[0], "se") else 0 for stage in model.stages]


# --------------------------------------------------------------------------- the Python API


def test_se_reduction_reaches_every_block() -> None:
    assert se_widths(create_model("seresnet20")) == [8, 8, 8]  # max(8, channels // 16)
    model = create_model("seresnet20", block_args={"reduction": 2})
    assert se_widths(model) == [8, 16, 32]
    assert {block.se.fc1.out_channels for stage in model.stages[1:] for block in stage} == {16, 32}
    assert se_widths(create_model("seresnet50", layers=(1, 1, 1, 1), block_args={"reduction": 8})) == [
        32, 64, 128, 256,
    ]  # fmt: skip


def test_a_list_gives_each_stage_its_own_options() -> None:
    model = create_model(
        "resnet20", block=["basic", "se_basic", "se_basic"], block_args=[{}, {"reduction": 4}, {"reduction": 2}]
    )
    assert se_widths(model) == [0, 8, 32]


def test_a_user_block_takes_its_own_option(gate_module: str) -> None:
    model = create_model("resnet20", block=gate_module, block_args={"gate_init": 0.25})
    gates = [block.gate.item() for stage in model.stages for block in stage]
    assert gates == [0.25] * 9
    default = create_model("resnet20", block=gate_module)
    assert default.stages[0][0].gate.item() == 1.0


def test_an_unknown_option_is_one_line_naming_the_block_and_its_options(gate_module: str) -> None:
    with pytest.raises(ModelConfigError) as excinfo:
        create_model("resnet20", block=gate_module, block_args={"gate_int": 0.25})
    assert str(excinfo.value) == MISSPELT.format(gate_module)
    with pytest.raises(ModelConfigError, match=r"^block 'se_bottleneck' \(SEBottleneck\) has no option\(s\) "
                                               r"reductoin; valid options: reduction$"):  # fmt: skip
        create_model("seresnet50", block_args={"reductoin": 8})
    with pytest.raises(ModelConfigError, match=r"^block 'basic' \(BasicBlock\) has no option\(s\) reduction; "
                                               r"valid options: none$"):  # fmt: skip
        create_model("resnet20", block_args={"reduction": 8})
    # A ModelConfigError is a ValueError, as the other configuration errors of the zoo.
    assert issubclass(ModelConfigError, ValueError)


def test_the_options_are_checked_before_any_block_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = SEBasicBlock.__init__

    def counting_init(self: SEBasicBlock, *args: object, **kwargs: object) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(SEBasicBlock, "__init__", counting_init)
    # A per-stage list whose last entry is wrong: the first two stages are not built either.
    with pytest.raises(ModelConfigError, match="has no option"):
        create_model("resnet20", block="se_basic", block_args=[{"reduction": 2}, {"reduction": 2}, {"ratio": 2}])
    assert built == []


@pytest.mark.parametrize(
    ("name", "setting"),
    [("stride", "net.strides"), ("norm_layer", "net.norm"), ("drop_path", "net.drop_path"), ("groups", "net.groups")],
)
def test_builder_arguments_cannot_be_set_as_options(name: str, setting: str) -> None:
    with pytest.raises(ModelConfigError, match=rf"net\.block_args cannot set {name} \({setting}\)"):
        create_model("seresnet20", block_args={name: 1})


def test_every_builder_argument_of_the_protocol_is_reserved() -> None:
    protocol = set(inspect.signature(ResidualBlock.__init__).parameters) - {"self"}
    assert protocol == set(BUILDER_ARGS)


def test_a_per_stage_list_must_match_the_stages() -> None:
    with pytest.raises(ModelConfigError, match=r"net\.block_args lists 2 entries but there are 3 stages"):
        create_model("seresnet20", block_args=[{"reduction": 2}, {}])
    with pytest.raises(ModelConfigError, match="must be a mapping or a list of mappings"):
        create_model("seresnet20", block_args="reduction")
    with pytest.raises(ModelConfigError, match="must map option names to values"):
        create_model("seresnet20", block_args=[{"reduction": 2}, {}, ["reduction"]])


def test_a_required_option_that_is_not_set_is_named() -> None:
    class NeedsKernel(ResidualBlock):
        def __init__(self, in_channels: int, channels: int, stride: int = 1, *, kernel: int, **kwargs: object):
            super().__init__(in_channels, channels, stride, **kwargs)
            self.conv = nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2)

        def residual(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.raises(ModelConfigError, match=r"block .*NeedsKernel needs option\(s\) kernel in net\.block_args"):
        create_model("resnet20", block=NeedsKernel)
    model = create_model("resnet20", block=NeedsKernel, block_args={"kernel": 5})
    assert model.stages[0][0].conv.kernel_size == (5, 5)


def test_options_follow_kwargs_up_the_class_hierarchy() -> None:
    assert list(block_options(SEBasicBlock)) == ["reduction"]
    assert list(block_options(SEBottleneck)) == ["reduction"]

    class Scaled(SEBasicBlock):
        def __init__(self, *args: object, scale: float = 1.0, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.scale = scale

    assert sorted(block_options(Scaled)) == ["reduction", "scale"]
    model = create_model("resnet20", block=Scaled, block_args={"scale": 0.5, "reduction": 2})
    assert model.stages[2][0].scale == 0.5
    assert se_widths(model) == [8, 16, 32]

    class Closed(SEBasicBlock):
        """Takes no **kwargs: the base options are not reachable through it."""

        def __init__(self, in_channels: int, channels: int, stride: int = 1, *, groups: int = 1,
                     width_per_group: int = 64, shortcut: str = "conv_bn", norm_layer: type = nn.BatchNorm2d,
                     act_layer: type = nn.ReLU, drop_path: float = 0.0) -> None:  # fmt: skip
            super().__init__(in_channels, channels, stride, shortcut=shortcut, norm_layer=norm_layer,
                             act_layer=act_layer, drop_path=drop_path)  # fmt: skip

    assert block_options(Closed) == {}


def test_block_args_survive_the_checkpoint_hyperparameters(tmp_path: Path) -> None:
    block_args = [{"reduction": 1}, {"reduction": 2}, {}]
    net = NetworkConfig(block="se_basic", layers=[1, 1, 1], block_args=block_args)
    module = ResNetClassifier(arch="resnet20", num_classes=3, net=net)
    assert module.hparams.net["block_args"] == block_args
    assert se_widths(module.net) == [16, 16, 8]  # without the options: [8, 8, 8], and the weights would not load
    data = SyntheticDataModule(num_classes=3, image_size=8, num_samples=8, num_val_samples=4, batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "se.ckpt")

    loaded = ResNetClassifier.load_from_checkpoint(tmp_path / "se.ckpt")
    assert loaded.hparams.net["block_args"] == block_args
    assert se_widths(loaded.net) == [16, 16, 8]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- the CLI and YAML


def _write_config(tmp_path: Path, block: str, block_args: str) -> Path:
    config = tmp_path / "gated.yaml"
    config.write_text(
        textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {tmp_path / "run"}
        model:
          arch: resnet20
          net:
            block: {block}
            layers: [1, 1, 1]
            block_args: {block_args}
        data:
          class_path: resnet_lit.data.SyntheticDataModule
          init_args:
            num_classes: 3
            image_size: 8
            num_samples: 8
            num_val_samples: 4
            num_test_samples: 4
            batch_size: 4
        """)
    )
    return config


def test_a_user_block_option_set_in_yaml_is_built_with_that_value(gate_module: str, tmp_path: Path) -> None:
    config = _write_config(tmp_path, gate_module, "{gate_init: 0.25}")
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])

    cli = ResNetLitCLI(args=["--config", str(config)], run=False)
    gates = [block.gate.item() for stage in cli.model.net.stages for block in stage]
    assert gates == [0.25, 0.25, 0.25]
    assert type(cli.model.net.stages[0][0]).__name__ == "GatedBlock"
    assert cli.model.hparams.net["block_args"] == {"gate_init": 0.25}


def test_a_misspelt_option_in_yaml_fails_at_start_up_naming_the_block(gate_module: str, tmp_path: Path) -> None:
    config = _write_config(tmp_path, gate_module, "{gate_int: 0.25}")
    with pytest.raises(ModelConfigError) as excinfo:
        ResNetLitCLI(args=["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])
    assert str(excinfo.value) == MISSPELT.format(gate_module)
    assert not (tmp_path / "run").exists()


def test_the_cli_reports_a_misspelt_option_in_one_line(gate_module: str, tmp_path: Path) -> None:
    config = _write_config(tmp_path, gate_module, "{gate_int: 0.25}")
    expected = MISSPELT.format(gate_module)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == f"resnet-lit: error: {expected}"
    assert not (tmp_path / "run").exists()
