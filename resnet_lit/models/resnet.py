"""The ResNet network: a stem, stages of residual blocks, and a pooled linear head.

Every architectural choice is a constructor argument with a registry name, so a YAML config or a
`create_model(name, **overrides)` call can change any of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Sequence
from typing import Any

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

    Backbone use (timm's API): `feature_info` lists, per feature index, the module, channels (`num_chs`) and
    downsampling (`reduction`), index 0 being the stem and 1..N the stages; `forward_intermediates(x, indices)`
    returns the feature maps at those indices, running no stage after the deepest; `reset_classifier(n)` gives the
    head `n` outputs (0: `forward` returns the pooled features). `create_model(name, features_only=True,
    out_indices=...)` returns the network as a :class:`~resnet_lit.models.features.ResNetFeatures` backbone without
    its head. A custom stem should set `stride` (as `Stem` does) for `reduction` to be right.
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
            _check_fits(image_size, _stem_stride(self.stem), strides)

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
        self.feature_info = _feature_info(self.stem, stem_width, self.stages)
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
        return forward_trunk(self, x)[0]

    def forward_intermediates(
        self, x: Tensor, indices: int | Sequence[int] | None = None, *, stop_early: bool = True
    ) -> list[Tensor]:
        """The feature maps at `indices` (0 = stem output, i = output of stage i), in index order.

        `indices`: None = every stage (1..N); an int n = the last n indices; a sequence = those indices (negative
        ones count from the end). With `stop_early` no stage after the deepest requested one runs. Gradient
        checkpointing applies as in `forward_features`. In a pre-activation network the stage outputs are the raw
        sums: the final norm and activation belong to the head. Unlike timm's, it returns only the list.
        """
        take = resolve_feature_indices(indices, len(self.stages))
        return forward_trunk(self, x, num_stages=take[-1] if stop_early else None, keep=take)[1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a new `nn.Linear(num_features, num_classes)` on the device and dtype of the
        network; 0 replaces it by `nn.Identity`, so `forward` returns the pooled features (timm's API)."""
        if num_classes < 0:
            raise ModelConfigError(f"reset_classifier: num_classes must be >= 0 (0 = no classifier), got {num_classes}")
        reference = next(itertools.chain(self.head.fc.parameters(), self.parameters()))
        self.head.fc = (
            nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype)
            if num_classes
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def forward_trunk(
    net: nn.Module, x: Tensor, *, num_stages: int | None = None, keep: Container[int] = ()
) -> tuple[Tensor, list[Tensor]]:
    """Run `net.stem` and the first `num_stages` of `net.stages` (all if None) on `x`: the last output, and the
    outputs at the feature indices in `keep` (0 = stem, i = stage i) in index order.

    `net` is a `ResNet` or a `ResNetFeatures`; while it trains with `grad_checkpointing` set, every block is
    checkpointed. The one loop behind `forward_features`, `forward_intermediates` and `ResNetFeatures`.
    """
    x = net.stem(x)
    kept = [x] if 0 in keep else []
    checkpointing = net.grad_checkpointing and net.training and torch.is_grad_enabled()
    for index, stage in enumerate(net.stages, start=1):
        if num_stages is not None and index > num_stages:
            break
        if checkpointing:
            for block in stage:
                x = checkpointed_call(block, x)
        else:
            x = stage(x)
        if index in keep:
            kept.append(x)
    return x, kept


def resolve_feature_indices(indices: int | Sequence[int] | None, num_stages: int, *, key: str = "indices") -> list[int]:
    """Feature indices of a network with `num_stages` stages, sorted and without repeats.

    None = every stage (1..N); an int n = the last n of 0..N; a sequence = those (negative ones count from the end).
    `key` names the argument in errors.
    """
    count = num_stages + 1
    if indices is None:
        return list(range(1, count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= count:
            raise ModelConfigError(
                f"{key}={indices}: an int takes the last n feature indices, so it must be in 1..{count} "
                f"(the stem and {num_stages} stages)"
            )
        return list(range(count - indices, count))
    resolved = set()
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ModelConfigError(
                f"{key}={list(indices)}: {index!r} is not a feature index; valid indices are 0..{num_stages} "
                f"(0 = stem, 1..{num_stages} = stages) or -{count}..-1 from the end"
            )
        resolved.add(index % count)
    if not resolved:
        raise ModelConfigError(f"{key} is empty; name at least one feature index in 0..{num_stages}, or use None")
    return sorted(resolved)


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


def _stem_stride(stem: nn.Module) -> int:
    """The stem's downsampling: its `stride` attribute (a `Stem` sets it; a bare convolution has a pair), else 1."""
    stride = getattr(stem, "stride", 1)
    return stride[0] if isinstance(stride, tuple | list) else stride


def _feature_info(stem: nn.Module, stem_width: int, stages: nn.ModuleList) -> list[dict[str, Any]]:
    """timm-style `feature_info`: per feature index (0 = stem, i = stage i) its module, channels and reduction."""
    reduction = _stem_stride(stem)
    info: list[dict[str, Any]] = [{"index": 0, "module": "stem", "num_chs": stem_width, "reduction": reduction}]
    for index, stage in enumerate(stages, start=1):
        for block in stage:
            reduction *= block.stride
        info.append(
            {"index": index, "module": f"stages.{index - 1}", "num_chs": stage[-1].out_channels, "reduction": reduction}
        )
    return info


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
