"""Per-stage summary of a network: output shape, parameters and multiply-accumulates (MACs).

MACs are half the FLOPs that torch's `FlopCounterMode` counts (convolutions and matrix products) at batch
size 1: the convention behind the usual "ResNet-50 = 4.1 GFLOPs" figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnet_lit.models.resnet import ResNet


@dataclass(frozen=True)
class LayerSummary:
    """One row of the table."""

    name: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def summarize(model: ResNet, image_size: int = 224, in_channels: int | None = None) -> list[LayerSummary]:
    """Rows for the stem, each stage and the head of `model` for a 1 x C x S x S input."""
    from torch.utils.flop_counter import FlopCounterMode  # 0.1 s of imports only `describe` needs

    if in_channels is None:
        in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    parts: list[tuple[str, nn.Module]] = [("stem", model.stem)]
    parts += [(f"stage{i}", stage) for i, stage in enumerate(model.stages, start=1)]
    parts.append(("head", model.head))

    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        part.register_forward_hook(lambda _m, _inp, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, part in parts
    ]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, image_size, image_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    # The counter keys each module by its path below the root, which it names by class: "ResNet.stages.0".
    flops = counter.get_flop_counts()
    paths = {id(module): f"{type(model).__name__}.{path}" for path, module in model.named_modules() if path}
    return [
        LayerSummary(
            name,
            shapes[name],
            sum(p.numel() for p in part.parameters()),
            sum(flops.get(paths[id(part)], {}).values()) // 2,
        )
        for name, part in parts
    ]


def format_summary(name: str, rows: list[LayerSummary], image_size: int, in_channels: int) -> str:
    """A plain-text table with a header stating the MAC convention and totals."""
    total_params = sum(r.params for r in rows)
    total_macs = sum(r.macs for r in rows)
    lines = [
        f"{name} @ {in_channels}x{image_size}x{image_size} "
        "(MACs = multiply-accumulates of conv/linear layers, batch 1; 1 GMAC is the usual '1 GFLOP')",
        f"{'layer':<8} {'output (C x H x W)':>20} {'params':>14} {'MACs':>16}",
    ]
    for r in rows:
        shape = " x ".join(str(d) for d in r.output_shape)
        lines.append(f"{r.name:<8} {shape:>20} {r.params:>14,} {r.macs:>16,}")
    lines.append(f"{'total':<8} {'':>20} {total_params:>14,} {total_macs:>16,}")
    macs_text = f"{total_macs / 1e9:.1f} G" if total_macs >= 1e9 else f"{total_macs / 1e6:.1f} M"
    lines.append(f"params: {total_params / 1e6:.2f} M   MACs: {macs_text}")
    return "\n".join(lines)
