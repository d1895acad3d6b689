"""`compile: true`: every network traces to one graph (no graph breaks) in training and eval, and compiled
training/eval matches eager. Inductor compiles take about a minute per network on a 2-core CPU, so the real
compiles run on tiny networks covering every block, stem and shortcut type, and are marked slow."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

from resnet_lit.cli import ResNetLitCLI
from resnet_lit.models import BLOCKS, SHORTCUTS, STEMS, create_model, list_models

# Tiny networks that together use every built-in block, stem and shortcut, plus DropPath, SE and groups.
TINY = {
    "cifar-basic-identity_pad-droppath": dict(
        arch="resnet20", block="basic", stem="cifar", shortcut="identity_pad", layers=(1, 1, 1),
        widths=(4, 8, 8), stem_width=4, drop_path=0.2,
    ),
    "cifar-se_basic-conv_bn": dict(
        arch="resnet18_cifar", block="se_basic", stem="cifar", shortcut="conv_bn", layers=(1, 1),
        widths=(8, 16), strides=(1, 2), stem_width=8,
    ),
    "deep-se_bottleneck-avgpool_conv_bn-groups": dict(
        arch="resnet50d", block="se_bottleneck", stem="deep", shortcut="avgpool_conv_bn", layers=(1, 1),
        widths=(8, 16), strides=(1, 2), stem_width=8, groups=2, drop_path=0.1,
    ),
    "imagenet-basic+bottleneck-conv": dict(
        arch="resnet18_d2l", block=["basic", "bottleneck"], stem="imagenet", shortcut="conv", layers=(1, 1),
        widths=(8, 8), strides=(1, 2), stem_width=8,
    ),
    "preact_cifar-preact_basic-conv_nobias-droppath": dict(
        arch="preact_resnet110", block="preact_basic", stem="preact_cifar", shortcut="conv_nobias",
        layers=(1, 1, 1), widths=(4, 8, 8), stem_width=4, drop_path=0.1,
    ),
    "preact_imagenet-preact_bottleneck-plain": dict(
        arch="preact_resnet50", block="preact_bottleneck", stem="preact_imagenet", shortcut="conv_nobias",
        layers=(1, 1), widths=(8, 16), strides=(1, 2), stem_width=8, residual=False,
    ),
    "cifar-conv_pool-resnet9_layout": dict(
        arch="resnet18_cifar", block="conv_pool", stem="cifar", shortcut="conv_bn", layers=(1, 1, 1),
        widths=(8, 16, 16), strides=(2, 2, 2), stem_width=8, block_args=[{}, {"residual_branch": False}, {}],
    ),
}  # fmt: skip


def tiny_model(spec: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    spec = dict(spec)
    model = create_model(spec.pop("arch"), **spec)
    size = 16 if model.stem.stride == 1 else 32
    torch.manual_seed(0)
    return model, torch.randn(4, model.stem[0].in_channels, size, size)


def test_tiny_networks_cover_every_built_in_part() -> None:
    for key, registry in (("block", BLOCKS), ("stem", STEMS), ("shortcut", SHORTCUTS)):
        used = set()
        for spec in TINY.values():
            value = spec[key]
            used |= set(value) if isinstance(value, list) else {value}
        assert used >= {n for n in registry.names() if registry.origin(n) == "built-in"}, key
    assert any(s.get("drop_path") for s in TINY.values()) and any(s.get("groups", 1) > 1 for s in TINY.values())


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_graph_breaks(name: str, mode: str) -> None:
    model, images = tiny_model(TINY[name])
    getattr(model, mode)()
    dynamo.reset()
    explanation = dynamo.explain(model)(images.contiguous(memory_format=torch.channels_last))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_no_graph_breaks_in_any_zoo_model(name: str) -> None:
    """Every named network's stem, blocks and head, at two blocks per stage: depth repeats the same blocks, and
    tracing all 333 blocks of preact_resnet1001 alone would take minutes."""
    depths = [len(stage) for stage in create_model(name).stages]
    model = create_model(name, layers=[min(2, depth) for depth in depths])
    size = 32 if model.stem.stride == 1 else 64
    images = torch.randn(2, model.stem[0].in_channels, size, size)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        dynamo.reset()
        explanation = dynamo.explain(model)(images)
        assert explanation.graph_break_count == 0, (mode, [str(b.reason) for b in explanation.break_reasons])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar-basic-identity_pad-droppath", "deep-se_bottleneck-avgpool_conv_bn-groups"])
def test_compiled_training_and_eval_match_eager(name: str) -> None:
    eager, images = tiny_model({**TINY[name], "drop_path": 0.0})  # DropPath is random: compare without it
    eager = eager.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.arange(len(images)) % 10
    for model in (eager, compiled):
        model.train()
        F.cross_entropy(model(images), targets).backward()
    for (pname, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-4, rtol=1e-3, msg=pname)
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_fit_with_compile_runs_training_and_validation(tmp_path: Path) -> None:
    """`model.compile: true` through the CLI: compiled training steps, then compiled validation."""
    cli = ResNetLitCLI(args=[
        "fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path),
        "--model.arch", "resnet20", "--model.compile", "true", "--model.net.layers", "[1, 1, 1]",
        "--model.net.widths", "[4, 8, 8]", "--model.net.stem_width", "4", "--model.net.drop_path", "0.1",
        "--data", "resnet_lit.data.SyntheticDataModule", "--data.image_size", "16", "--data.num_samples", "24",
        "--data.num_val_samples", "8", "--data.batch_size", "8", "--data.loader", "device",
    ])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert {"train/loss", "val/acc"} <= set(cli.trainer.callback_metrics)
