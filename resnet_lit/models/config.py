"""`NetworkConfig`: the `model.net` section of a config, overrides of a named architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from jsonargparse.typing import NonNegativeFloat, PositiveInt


@dataclass
class NetworkConfig:
    """Overrides of the named architecture; `None` keeps the architecture's own value.

    Any field maps to the `ResNet` constructor argument of the same name, so
    `net: {stem: deep, shortcut: avgpool_conv_bn}` turns a ResNet-50 into a ResNet-D, and
    `net: {block: se_bottleneck, block_args: {reduction: 8}}` sets an option of every block, and
    `net: {residual: false}` builds the plain network of the same layers (no shortcuts).
    """

    block: str | list[str] | None = None
    block_args: dict[str, Any] | list[dict[str, Any]] | None = None
    layers: list[PositiveInt] | None = None
    widths: list[PositiveInt] | None = None
    strides: list[PositiveInt] | None = None
    stem: str | None = None
    stem_width: PositiveInt | None = None
    shortcut: str | None = None
    groups: PositiveInt | None = None
    width_per_group: PositiveInt | None = None
    norm: str | None = None
    act: str | None = None
    zero_init_residual: bool | None = None
    drop_path: NonNegativeFloat | None = None
    residual: bool | None = None
    dropout: NonNegativeFloat | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields that were set, as keyword arguments for `create_model`."""
        return {k: v for k, v in asdict(self).items() if v is not None}
