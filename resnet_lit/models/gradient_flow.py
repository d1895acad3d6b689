"""Gradient norms per part of a network (stem, each stage, head) and per residual block, and the gradient flow
of an architecture at initialisation.

The norms are computed on the gradients' device and returned as tensors, so a training callback can log them
without a host sync (`resnet_lit.callbacks.GradientNormMonitor`). `initial_gradient_flow` runs one forward and
backward pass on a seeded random batch: in a residual network the gradient reaches the first blocks through the
identity shortcuts, in a plain network of the same depth it vanishes or explodes on the way
(`resnet-lit describe NAME --gradients`; `plot_gradient_flow` draws one or more networks for comparison).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lit.errors import ResNetLitError
from resnet_lit.models.zoo import create_model

ParameterGroups = list[tuple[str, list[nn.Parameter]]]


def has_resnet_layout(net: nn.Module) -> bool:
    """Whether `net` has a resnet_lit `ResNet`'s layout: a `stem` module, a list of `stages` and a `head`."""
    return (
        isinstance(getattr(net, "stem", None), nn.Module)
        and isinstance(getattr(net, "stages", None), nn.ModuleList | nn.Sequential)
        and isinstance(getattr(net, "head", None), nn.Module)
    )


def part_parameters(net: nn.Module) -> ParameterGroups:
    """The parameters of each part of `net`, in forward order: `stem`, `stage1` ... `stageN`, `head` for a network
    with the `ResNet` layout (any other top-level child module after them, by its attribute name); for any other
    network, its top-level child modules by their attribute names. Parameters held by `net` itself are the group
    `own`. Parts without parameters are left out."""
    parts: list[tuple[str, nn.Module]] = []
    if has_resnet_layout(net):
        stages: nn.Module = net.stages  # type: ignore[assignment]
        parts = [("stem", net.stem), *((f"stage{i}", s) for i, s in enumerate(stages, start=1)), ("head", net.head)]
        covered = {id(net.stem), id(stages), id(net.head)}
        parts += [(name, child) for name, child in net.named_children() if id(child) not in covered]
    else:
        parts = list(net.named_children())
    groups = [(name, list(part.parameters())) for name, part in parts]
    groups.append(("own", list(net.parameters(recurse=False))))
    return [(name, params) for name, params in groups if params]


def block_parameters(net: nn.Module) -> ParameterGroups:
    """The parameters of the stem and of each block of each stage (`stage1.0`, `stage1.1`, ...) of a network with
    the `ResNet` layout, in forward order."""
    if not has_resnet_layout(net):
        raise ResNetLitError(
            f"per-block gradient norms need a network with a stem, stages and a head (a resnet_lit ResNet), not a "
            f"{type(net).__name__}"
        )
    groups: ParameterGroups = [("stem", list(net.stem.parameters()))]  # type: ignore[union-attr]
    for i, stage in enumerate(net.stages, start=1):  # type: ignore[arg-type]
        groups += [(f"stage{i}.{j}", list(block.parameters())) for j, block in enumerate(stage.children())]
    return groups


def gradient_norms(groups: ParameterGroups, norm_type: float = 2.0, skip: Collection[int] = ()) -> dict[str, Tensor]:
    """The `norm_type`-norm of all gradients of each group (as if concatenated into one vector, as gradient
    clipping measures it), a 0-dim tensor on the gradients' device: no host sync. Parameters without a gradient,
    and those whose `id` is in `skip`, are left out; so are groups with no gradient left."""
    skipped = set(skip)
    norms = {}
    for name, params in groups:
        grads = [p.grad for p in params if p.grad is not None and id(p) not in skipped]
        if grads:
            norms[name] = torch.nn.utils.get_total_norm(grads, norm_type)
    return norms


@dataclass(frozen=True)
class GradientFlow:
    """Gradient norms of one forward/backward pass: per part (`stem`, `stage1`..., `head`, and `total`) and per
    block (`stem`, `stage1.0`, ...), in forward order."""

    name: str
    parts: dict[str, float]
    blocks: dict[str, float]
    params: dict[str, int]  # parameters per part
    loss: float
    batch_shape: tuple[int, ...]
    norm_type: float
    seed: int


def measure_gradient_flow(
    net: nn.Module, images: Tensor, targets: Tensor, norm_type: float = 2.0, name: str = "", seed: int = 0
) -> GradientFlow:
    """One forward/backward pass of `net` in train mode on `images` with cross-entropy against `targets`, and the
    gradient norms it leaves. The parameters' gradients are cleared before and after; the mode is restored."""
    was_training = net.training
    net.zero_grad(set_to_none=True)
    try:
        net.train()
        loss = F.cross_entropy(net(images), targets)
        loss.backward()
        parts = part_parameters(net)
        part_norms = gradient_norms(parts, norm_type)
        total = torch.nn.utils.get_total_norm(list(part_norms.values()), norm_type)
        blocks = gradient_norms(block_parameters(net), norm_type)
        return GradientFlow(
            name=name,
            parts={k: float(v) for k, v in part_norms.items()} | {"total": float(total)},
            blocks={k: float(v) for k, v in blocks.items()},
            params={k: sum(p.numel() for p in params) for k, params in parts},
            loss=float(loss.detach()),
            batch_shape=tuple(images.shape),
            norm_type=norm_type,
            seed=seed,
        )
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)


def initial_gradient_flow(
    name: str,
    *,
    batch_size: int = 8,
    seed: int = 0,
    image_size: int | None = None,
    in_channels: int | None = None,
    norm_type: float = 2.0,
) -> GradientFlow:
    """The gradient flow of zoo architecture `name` at initialisation: the network built with seed `seed`, one
    batch of `batch_size` standard-normal images (side `image_size`, default 32 for a stride-1 stem, else 224)
    with uniformly random labels drawn from the same seed. The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(name, **({} if in_channels is None else {"in_channels": in_channels}))
        if image_size is None:
            image_size = 32 if getattr(getattr(net, "stem", None), "stride", None) == 1 else 224
        if in_channels is None:
            in_channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
        images = torch.randn(batch_size, in_channels, image_size, image_size)
        num_classes = _num_classes(net, images)
        targets = torch.randint(0, num_classes, (batch_size,))
        return measure_gradient_flow(net, images, targets, norm_type, name=name, seed=seed)


def _num_classes(net: nn.Module, images: Tensor) -> int:
    fc = getattr(getattr(net, "head", None), "fc", None)
    if isinstance(fc, nn.Linear):
        return fc.out_features
    was_training = net.training
    try:
        with torch.no_grad():
            return net.eval()(images[:1]).shape[1]
    finally:
        net.train(was_training)


def format_gradient_flow(flow: GradientFlow) -> str:
    """A table of the per-part norms, then one row per block (index 0: the stem)."""
    norm = "L2" if flow.norm_type == 2 else f"L{flow.norm_type:g}"
    batch = "x".join(str(d) for d in flow.batch_shape[1:])
    lines = [
        f"{flow.name} gradient norms at initialisation ({norm} norm of each part's parameter gradients after one "
        f"forward/backward in train mode: {flow.batch_shape[0]} random {batch} images, random labels, "
        f"cross-entropy {flow.loss:.4f}, seed {flow.seed})",
        f"{'part':<10} {'grad norm':>12} {'params':>14}",
    ]
    for name, value in flow.parts.items():
        params = flow.params.get(name, sum(flow.params.values()))
        lines.append(f"{name:<10} {value:>12.4e} {params:>14,}")
    lines.append("")
    lines.append(f"{'block':<6} {'name':<12} {'grad norm':>12}")
    lines += [f"{i:<6} {name:<12} {value:>12.4e}" for i, (name, value) in enumerate(flow.blocks.items())]
    return "\n".join(lines)


def plot_gradient_flow(flows: Mapping[str, GradientFlow], path: str | Path, title: str | None = None) -> None:
    """Draw the gradient norm per block index (0: the stem; log scale) of each labelled flow into a PNG at
    `path`, with the stage boundaries of the first one. Needs matplotlib (the `plots` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ResNetLitError(
            "plotting gradient norms needs matplotlib, which is not installed; install the plots extra: "
            "pip install 'resnet-lit[plots]'"
        ) from None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, flow in flows.items():
        ax.plot(range(len(flow.blocks)), list(flow.blocks.values()), marker=".", label=label)
    first = next(iter(flows.values()), None)
    if first is not None:
        stages = [name.split(".")[0] for name in first.blocks]
        for index in range(1, len(stages)):
            if stages[index] != stages[index - 1]:
                ax.axvline(index - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("block (0: stem; dotted lines: stage boundaries)")
    ax.set_ylabel("gradient norm")
    ax.set_title(title or "gradient norm per block at initialisation")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as err:
        raise ResNetLitError(f"cannot write the plot {str(path)!r}: {err.strerror or err}") from None
