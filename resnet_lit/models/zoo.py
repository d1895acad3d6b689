"""Named architectures: `create_model("resnet50", **overrides)` and `list_models("resnet*")`.

Each entry is a factory that returns a network built from its defaults updated with the caller's overrides,
so a config names an architecture and changes only what it needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from resnet_lit.models.errors import ModelConfigError
from resnet_lit.models.features import ResNetFeatures
from resnet_lit.models.resnet import ResNet
from resnet_lit.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", "resnet_lit.models")
register_model = MODELS.register  # decorator for a factory `(**overrides) -> nn.Module`

_RESNET_ARGS = frozenset(p for p in inspect.signature(ResNet.__init__).parameters if p != "self")


def create_model(
    name: str, *, features_only: bool = False, out_indices: int | Sequence[int] | None = None, **overrides: Any
) -> nn.Module:
    """Build the architecture `name` with any constructor argument of `ResNet` overridden.

    `features_only=True` returns it as a `ResNetFeatures` backbone instead (timm's argument): no head, and
    `forward(x)` returns the feature maps at `out_indices` (default: every stage; 0 is the stem).
    """
    if out_indices is not None and not features_only:
        raise ModelConfigError(
            f"out_indices={out_indices!r} needs features_only=True: only the backbone returns feature maps; "
            "pass features_only=True, or use model.forward_intermediates(x, indices)"
        )
    model = MODELS.get(name)(**overrides)
    if not features_only:
        return model
    if not isinstance(model, ResNet):
        raise ModelConfigError(
            f"features_only=True needs a resnet_lit ResNet (with forward_intermediates), but model {name!r} builds "
            f"a {type(model).__name__}; drop features_only, or make the factory return a ResNet"
        )
    return ResNetFeatures(model, out_indices)


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching an fnmatch pattern, e.g. `"resnet*"` or `"*cifar*"`."""
    return MODELS.names(pattern)


def build_resnet(defaults: dict[str, Any], overrides: dict[str, Any]) -> ResNet:
    """`ResNet(**defaults | overrides)`, with a clear error for an unknown override."""
    unknown = sorted(set(overrides) - _RESNET_ARGS)
    if unknown:
        raise ModelConfigError(f"unknown model override(s) {unknown}; valid keys: {', '.join(sorted(_RESNET_ARGS))}")
    return ResNet(**{**defaults, **overrides})


def _builtin(name: str, **defaults: Any) -> None:
    def factory(**overrides: Any) -> ResNet:
        return build_resnet(defaults, overrides)

    factory.__name__ = name
    factory.__doc__ = f"{name}: ResNet({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    MODELS.builtin(name)(factory)


# ImageNet family (He et al. 2016, table 1; torchvision's layouts).
_IMAGENET = {"stem": "imagenet", "shortcut": "conv_bn", "num_classes": 1000}
_builtin("resnet18", block="basic", layers=(2, 2, 2, 2), **_IMAGENET)
_builtin("resnet34", block="basic", layers=(3, 4, 6, 3), **_IMAGENET)
_builtin("resnet50", block="bottleneck", layers=(3, 4, 6, 3), **_IMAGENET)
_builtin("resnet101", block="bottleneck", layers=(3, 4, 23, 3), **_IMAGENET)
_builtin("resnet152", block="bottleneck", layers=(3, 8, 36, 3), **_IMAGENET)
_builtin("resnext50_32x4d", block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4, **_IMAGENET)
_builtin("resnext101_32x8d", block="bottleneck", layers=(3, 4, 23, 3), groups=32, width_per_group=8, **_IMAGENET)
_builtin("wide_resnet50_2", block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128, **_IMAGENET)
_builtin("wide_resnet101_2", block="bottleneck", layers=(3, 4, 23, 3), width_per_group=128, **_IMAGENET)
_builtin("resnet50d", block="bottleneck", layers=(3, 4, 6, 3), stem="deep", shortcut="avgpool_conv_bn",
         num_classes=1000)  # fmt: skip
_builtin("seresnet50", block="se_bottleneck", layers=(3, 4, 6, 3), **_IMAGENET)

# CIFAR family (He et al. 2016, section 4.2): depth 6n+2, widths 16/32/64, option-A shortcuts.
_CIFAR = {
    "block": "basic", "widths": (16, 32, 64), "strides": (1, 2, 2), "stem": "cifar", "stem_width": 16,
    "shortcut": "identity_pad", "num_classes": 10,
}  # fmt: skip
for _depth in (20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    _builtin(f"resnet{_depth}", layers=(_n, _n, _n), **_CIFAR)
_builtin("seresnet20", **{**_CIFAR, "block": "se_basic", "layers": (3, 3, 3)})

# Plain networks (He et al. 2016, section 4.2's baselines): the CIFAR ResNets' layers without shortcuts.
for _depth in (20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    _builtin(f"plain{_depth}", layers=(_n, _n, _n), residual=False, **_CIFAR)

# Pre-activation ResNets (He et al. 2016b): BN -> ReLU -> conv blocks, a bare convolution as stem, the final
# BN + ReLU in the head, and bias-free 1x1 projection shortcuts only where the shape changes (the paper's code).
_PREACT_IMAGENET = {"stem": "preact_imagenet", "shortcut": "conv_nobias", "num_classes": 1000}
_builtin("preact_resnet18", block="preact_basic", layers=(2, 2, 2, 2), **_PREACT_IMAGENET)
_builtin("preact_resnet34", block="preact_basic", layers=(3, 4, 6, 3), **_PREACT_IMAGENET)
_builtin("preact_resnet50", block="preact_bottleneck", layers=(3, 4, 6, 3), **_PREACT_IMAGENET)
_builtin("preact_resnet101", block="preact_bottleneck", layers=(3, 4, 23, 3), **_PREACT_IMAGENET)
_builtin("preact_resnet152", block="preact_bottleneck", layers=(3, 8, 36, 3), **_PREACT_IMAGENET)
# CIFAR: 110 = 6n+2 layers of basic blocks, 164 and 1001 = 9n+2 of bottlenecks (outputs 64/128/256).
_PREACT_CIFAR = {
    "widths": (16, 32, 64), "strides": (1, 2, 2), "stem": "preact_cifar", "stem_width": 16,
    "shortcut": "conv_nobias", "num_classes": 10,
}  # fmt: skip
_builtin("preact_resnet110", block="preact_basic", layers=(18, 18, 18), **_PREACT_CIFAR)
_builtin("preact_resnet164", block="preact_bottleneck", layers=(18, 18, 18), **_PREACT_CIFAR)
_builtin("preact_resnet1001", block="preact_bottleneck", layers=(111, 111, 111), **_PREACT_CIFAR)

# ResNet-18 adapted to 32x32 inputs: 3x3 stem, no max-pool (the common ~95% CIFAR-10 baseline).
_builtin("resnet18_cifar", block="basic", layers=(2, 2, 2, 2), stem="cifar", shortcut="conv_bn", num_classes=10)

# The d2l.ai chapter's ResNet-18: 1x1 shortcut convolutions with bias and no norm; 1-channel input.
_builtin("resnet18_d2l", block="basic", layers=(2, 2, 2, 2), stem="imagenet", shortcut="conv", in_channels=1,
         num_classes=10)  # fmt: skip
