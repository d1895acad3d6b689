"""The ResNet network: a stem, stages of residual blocks, and a pooled linear head.

Every architectural choice is a constructor argument with a registry name, so a YAML config or a
`create_model(name, **overrides)` call can change any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resnet_lit.models.block_options import BlockArgs, block_label, per_stage_block_args
from resnet_lit.models.blocks import BLOCKS, ResidualBlock
from resnet_lit.models.errors import ModelConfigError
from resnet_lit.models.grad_checkpoint import checkpointed_call
from resnet_lit.models.layers import ActLayer, NormLayer, resolve_act, resolve_norm
from resnet_lit.models.shortcuts import SHORTCUTS, ShortcutFactory
from resnet_lit.models.stems import STEMS, StemFactory

BlockSpec = str | type[ResidualBlock]


class ResNet(nn.Module):
    """A residual network (He et al., 2016) assembled from registry parts.

    Args:
        block: block name, dotted class path or class; or one per stage.
        block_args: options passed to every block's constructor (e.g. `{"reduction": 8}` for SE blocks),
            or a list with one mapping per stage; checked against the block's signature before building.
        layers: number of blocks per stage.
        widths: base width (`channels`) of each stage; outputs are `width * block.expansion`.
        strides: stride of the first block of each stage.
        stem: stem name ("imagenet", "cifar", "deep") or factory.
        stem_width: output channels of the stem.
        shortcut: shortcut used where a block changes shape ("conv_bn", "identity_pad", "conv",
            "avgpool_conv_bn").
        in_channels: input image channels.
        num_classes: classifier outputs.
        zero_init_residual: start every residual branch at zero (needs `zero_init_last()` on the block).
        drop_path: stochastic-depth rate of the last block; earlier blocks scale linearly from 0.
        residual: False builds a plain network (He et al. 2016's baselines): the same layers without any
            shortcut or sum, g(x) = act(f(x)).
        groups: grouped-convolution cardinality (ResNeXt).
        width_per_group: channels per group (64 = ResNet; 128 = Wide-ResNet-x2).
        norm: norm layer name ("batchnorm", "groupnorm", ...) or factory.
        act: activation name ("relu", "silu", ...) or factory.
        dropout: dropout before the classifier.
        image_size: if given, checks at construction that the strides fit this input size.
    """

    def __init__(
        self,
        *,
        block: BlockSpec | Sequence[BlockSpec] = "basic",
        block_args: BlockArgs | None = None,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        strides: Sequence[int] = (1, 2, 2, 2),
        stem: str | StemFactory = "imagenet",
        stem_width: int = 64,
        shortcut: str | ShortcutFactory = "conv_bn",
        in_channels: int = 3,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        residual: bool = True,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str | NormLayer = "batchnorm",
        act: str | ActLayer = "relu",
        dropout: float = 0.0,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        layers, widths, strides = list(layers), list(widths), list(strides)
        num_stages = len(layers)
        blocks = _per_stage_blocks(block, num_stages)
        stage_options = per_stage_block_args(block_args, blocks)
        _check_stage_layout(layers, widths, strides)
        _check_positive(in_channels=in_channels, num_classes=num_classes, stem_width=stem_width,
                        groups=groups, width_per_group=width_per_group)  # fmt: skip
        if not 0.0 <= drop_path < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {drop_path}")
        if not residual and drop_path > 0:
            raise ModelConfigError(
                f"net.drop_path={drop_path} needs a residual network, but net.residual is false: a plain network "
                "has no shortcut to keep when a block is dropped; set net.drop_path: 0 or net.residual: true"
            )
        if isinstance(shortcut, str):
            SHORTCUTS.get(shortcut)
        norm_layer, act_layer = resolve_norm(norm), resolve_act(act)

        self.stem = STEMS.resolve(stem)(in_channels, stem_width, norm_layer, act_layer)
        if image_size is not None:
            _check_fits(image_size, getattr(self.stem, "stride", 1), strides)

        total_blocks = sum(layers)
        rates = torch.linspace(0, drop_path, total_blocks).tolist() if total_blocks > 1 else [drop_path]
        self.stages = nn.ModuleList()
        channels_in, block_index = stem_width, 0
        for (_, block_cls), options, depth, width, stride in zip(
            blocks, stage_options, layers, widths, strides, strict=True
        ):
            stage = []
            for i in range(depth):
                unit = block_cls(
                    channels_in,
                    width,
                    stride if i == 0 else 1,
                    groups=groups,
                    width_per_group=width_per_group,
                    shortcut=shortcut,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    drop_path=rates[block_index],
                    residual=residual,
                    **options,
                )
                channels_in = unit.out_channels
                block_index += 1
                stage.append(unit)
            self.stages.append(nn.Sequential(*stage))
        self.num_features = channels_in
        # Pre-activation blocks end with the sum: the final norm and activation go before the pooling.
        pre_activation = not blocks[-1][1].post_activation
        self.head = ClassifierHead(
            channels_in, num_classes, dropout, norm_layer=norm_layer if pre_activation else None, act_layer=act_layer
        )
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()

    grad_checkpointing = False  # see set_grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block while training: keep only the blocks' inputs for the backward pass and
        recompute the rest there, trading about one more forward pass for much less activation memory.

        The recomputation updates no BatchNorm statistics and draws the same random numbers (see
        :mod:`resnet_lit.models.grad_checkpoint`), so training is the same as without; timm's name.
        """
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map before pooling."""
        x = self.stem(x)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.stages:
            if checkpointing:
                for block in stage:
                    x = checkpointed_call(block, x)
            else:
                x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class ClassifierHead(nn.Module):
    """An optional norm and activation, global average pooling, optional dropout and a linear classifier.

    The norm and activation are the final ones of a pre-activation network (`norm_layer` given). They sit in the
    head so that layer-wise LR decay treats them as head, stage freezing never freezes them, and
    `model.reinit_head` (which re-initialises only the last `nn.Linear`) keeps them.
    """

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.0, *, norm_layer: NormLayer | None = None,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:  # fmt: skip
        super().__init__()
        # Identity modules hold no state: post-activation networks keep their state_dict keys. The activation is
        # not in place: with norm "identity" its input would be the features that forward_features returned.
        self.norm = norm_layer(in_features) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if norm_layer is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.act(self.norm(x))), 1)))


def _per_stage_blocks(block: BlockSpec | Sequence[BlockSpec], num_stages: int) -> list[tuple[str, type[ResidualBlock]]]:
    """Each stage's block class and its label for messages."""
    specs = [block] * num_stages if isinstance(block, str | type) else list(block)
    if len(specs) != num_stages:
        raise ModelConfigError(f"block lists {len(specs)} entries but there are {num_stages} stages (layers)")
    blocks = []
    for spec in specs:
        cls = BLOCKS.resolve(spec)
        if not (isinstance(cls, type) and issubclass(cls, ResidualBlock)):
            raise ModelConfigError(f"block {spec!r} is not a resnet_lit.ResidualBlock subclass")
        blocks.append((block_label(spec, cls), cls))
    return blocks


def _check_stage_layout(layers: list[int], widths: list[int], strides: list[int]) -> None:
    if not layers:
        raise ModelConfigError("layers must list at least one stage")
    if not len(layers) == len(widths) == len(strides):
        raise ModelConfigError(
            f"layers, widths and strides must have one entry per stage; got "
            f"layers={layers} ({len(layers)}), widths={widths} ({len(widths)}), "
            f"strides={strides} ({len(strides)})"
        )
    for name, values in (("layers", layers), ("widths", widths), ("strides", strides)):
        bad = [v for v in values if not isinstance(v, int) or v < 1]
        if bad:
            raise ModelConfigError(f"{name} must be positive integers, got {values}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ModelConfigError(f"{name} must be a positive integer, got {value}")


def _check_fits(image_size: int, stem_stride: int, strides: list[int]) -> None:
    size = -(-image_size // stem_stride)
    for index, stride in enumerate(strides, start=1):
        if size < stride:
            raise ModelConfigError(
                f"strides={strides}: stage {index} has stride {stride} but its input is only "
                f"{size}x{size} for image_size={image_size}; use stride 1 there or larger images"
            )
        size = -(-size // stride)
