"""The block protocol: one zero-init hook (`zero_init_last`) and the `post_activation` switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_lit import ResidualBlock, create_model
from resnet_lit.models import BasicBlock, Bottleneck, SEBasicBlock, SEBottleneck


class ConvBlock(ResidualBlock):
    """One 3x3 convolution with bias as the residual branch; supports zero_init_residual."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs: object) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)
        self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)


class LinearSumBlock(ConvBlock):
    """The same block without an activation after the sum: g(x) = f(x) + shortcut(x)."""

    post_activation = False


def test_post_activation_false_returns_the_plain_sum() -> None:
    torch.manual_seed(0)
    block = LinearSumBlock(8, 8).eval()
    assert isinstance(block.act, nn.Identity)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, block.conv(x) + x, rtol=0, atol=0)
    assert (out < 0).any()  # negative sums survive: no ReLU after the addition

    relu_block = ConvBlock(8, 8).eval()
    relu_block.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(relu_block(x), torch.relu(out), rtol=0, atol=0)


def test_post_activation_false_in_a_network_with_a_projection_shortcut() -> None:
    model = create_model("resnet20", block=LinearSumBlock).eval()
    block = model.stages[1][0]  # stride 2, 16 -> 32 channels: the identity_pad shortcut
    assert not isinstance(block.shortcut, nn.Identity)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.conv(x) + block.shortcut(x), rtol=0, atol=0)
        assert (block(x) < 0).any()
    assert not any(isinstance(m, nn.ReLU) for m in model.stages.modules())


@pytest.mark.parametrize(
    ("cls", "last"), [(BasicBlock, "bn2"), (Bottleneck, "bn3"), (SEBasicBlock, "bn2"), (SEBottleneck, "bn3")]
)
def test_every_built_in_block_zeroes_its_last_norm(cls: type[ResidualBlock], last: str) -> None:
    assert cls.zero_init_last is not ResidualBlock.zero_init_last
    block = cls(64, 16 if cls.expansion == 4 else 64).eval()
    block.zero_init_last()
    assert torch.count_nonzero(getattr(block, last).weight) == 0
    zeroed = [name for name, p in block.named_parameters() if name.endswith("weight") and not p.any()]
    assert zeroed == [f"{last}.weight"]
    x = torch.rand(2, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_the_base_class_has_no_naming_convention_and_asks_for_an_override() -> None:
    class NamedBnLast(ResidualBlock):
        """Has a `bn_last`, which the base class no longer looks for."""

        def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs: object) -> None:
            super().__init__(in_channels, channels, stride, **kwargs)
            self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
            self.bn_last = nn.BatchNorm2d(channels)

        def residual(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_last(self.conv(x))

    create_model("resnet20", block=NamedBnLast)  # zero_init_last is only called with zero_init_residual
    with pytest.raises(NotImplementedError, match=r"NamedBnLast .*override zero_init_last\(\)"):
        create_model("resnet20", block=NamedBnLast, zero_init_residual=True)


def test_zero_init_residual_calls_the_hook_of_every_block() -> None:
    model = create_model("resnet20", block=ConvBlock, zero_init_residual=True)
    assert all(not block.conv.weight.any() for stage in model.stages for block in stage)
    plain = create_model("resnet20", block=ConvBlock)
    assert all(block.conv.weight.any() for stage in plain.stages for block in stage)
