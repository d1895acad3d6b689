"""The backbone API (timm's names): `ResNet.feature_info`, `forward_intermediates`, `reset_classifier`, and
`create_model(name, features_only=True, out_indices=...)` returning a `ResNetFeatures`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from resnet_lit import ResidualBlock
from resnet_lit.models import MODELS, ModelConfigError, ResNet, ResNetFeatures, create_model
from resnet_lit.models import resnet as resnet_module
from threads import one_intra_op_thread


class WideningBlock(ResidualBlock):
    """A user block with its own expansion: one 3x3 convolution and a norm as the residual branch."""

    expansion = 2

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm_layer=nn.BatchNorm2d, **kwargs):
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv = nn.Conv2d(in_channels, self.out_channels, 3, stride, 1, bias=False)
        self.bn_last = norm_layer(self.out_channels)

    def residual(self, x: Tensor) -> Tensor:
        return self.bn_last(self.conv(x))


def conv_stem(in_channels: int, out_channels: int, norm_layer: Any, act_layer: Any) -> nn.Module:
    """A user stem that is a bare strided convolution: no `Stem`, its `stride` is Conv2d's pair."""
    return nn.Conv2d(in_channels, out_channels, 3, 2, 1)


# One network of every zoo family, and one of user parts: (architecture, overrides, input channels, image side).
FAMILIES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "resnet18": ("resnet18", {}, 3, 64),
    "resnet20": ("resnet20", {}, 3, 32),
    "resnext50_32x4d": ("resnext50_32x4d", {"layers": (1, 1, 1, 1)}, 3, 64),
    "wide_resnet50_2": ("wide_resnet50_2", {"layers": (1, 1, 1, 1)}, 3, 64),
    "resnet50d": ("resnet50d", {"layers": (1, 1, 1, 1)}, 3, 64),
    "seresnet50": ("seresnet50", {"layers": (1, 1, 1, 1)}, 3, 64),
    "seresnet20": ("seresnet20", {}, 3, 32),
    "preact_resnet18": ("preact_resnet18", {}, 3, 64),
    "preact_resnet110": ("preact_resnet110", {"layers": (3, 3, 3)}, 3, 32),
    "plain20": ("plain20", {}, 3, 32),
    "resnet18_cifar": ("resnet18_cifar", {}, 3, 32),
    "resnet18_d2l": ("resnet18_d2l", {}, 1, 64),
    "user_block_and_stem": (
        "resnet18", {"block": WideningBlock, "stem": conv_stem, "layers": (1, 2, 1), "widths": (8, 16, 32),
                     "strides": (1, 2, 2), "stem_width": 8}, 3, 32,
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small networks: one intra-op thread is as fast, and much faster on a busy machine (see tests/threads.py)."""
    with one_intra_op_thread():
        yield


def images(channels: int = 3, side: int = 32, batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_resnet50_backbone_at_224_matches_its_feature_info() -> None:
    backbone = create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        features = backbone(images(side=224, batch=1))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert backbone.out_indices == (1, 2, 3, 4)
    assert [info["module"] for info in backbone.feature_info] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert backbone.channels() == [256, 512, 1024, 2048]
    assert backbone.reductions() == [4, 8, 16, 32] == [224 // f.shape[-1] for f in features]
    assert not any(key.startswith("head.") for key in backbone.state_dict())


def test_resnet20_backbone_defaults_to_its_three_cifar_stages() -> None:
    backbone = create_model("resnet20", features_only=True).eval()
    with torch.no_grad():
        features = backbone(images(side=32))
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert backbone.out_indices == (1, 2, 3)
    assert backbone.channels() == [16, 32, 64]
    assert backbone.reductions() == [1, 2, 4]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_agrees_with_its_feature_info(family: str) -> None:
    """Each index's map has the channels and reduction `feature_info` states and is the output of the module it
    names; the last index is `forward_features`, through `forward_intermediates` and through `ResNetFeatures`."""
    arch, overrides, in_channels, side = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(arch, **overrides).eval()
    num_stages = len(model.stages)
    assert [info["index"] for info in model.feature_info] == list(range(num_stages + 1))
    assert [info["module"] for info in model.feature_info] == ["stem"] + [f"stages.{i}" for i in range(num_stages)]
    hooked: dict[str, Tensor] = {}
    for info in model.feature_info:
        name = info["module"]
        model.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: hooked.setdefault(name, out))
    x = images(in_channels, side)
    with torch.no_grad():
        every = model.forward_intermediates(x, list(range(num_stages + 1)))
        features = model.forward_features(x)
        last = model.forward_intermediates(x, [num_stages])
        backbone = ResNetFeatures(model)(x)
    assert len(every) == num_stages + 1
    for info, feature in zip(model.feature_info, every, strict=True):
        reduction = info["reduction"]
        assert tuple(feature.shape) == (2, info["num_chs"], side // reduction, side // reduction), info
        assert torch.equal(hooked[info["module"]], feature), info
    assert len(last) == 1
    assert torch.equal(last[0], features)
    assert len(backbone) == num_stages
    assert torch.equal(backbone[-1], features)


def test_feature_info_of_user_parts() -> None:
    """A user block's `out_channels` (expansion 2) and a bare-convolution stem's stride pair."""
    arch, overrides, _, _ = FAMILIES["user_block_and_stem"]
    info = create_model(arch, **overrides).feature_info
    assert [(i["num_chs"], i["reduction"]) for i in info] == [(8, 2), (16, 2), (32, 4), (64, 8)]


def test_indices_select_like_timm() -> None:
    """None = every stage, an int = the last n indices, negative indices count from the end; index order."""
    model = create_model("resnet20").eval()
    x = images(side=16)
    with torch.no_grad():
        every = model.forward_intermediates(x, [0, 1, 2, 3])
        shapes = {
            key: [tuple(f.shape) for f in model.forward_intermediates(x, indices)]
            for key, indices in {"none": None, "two": 2, "four": 4, "negative": [-1, 0, 2, -1], "tuple": (3, 1)}.items()
        }
    full = [tuple(f.shape) for f in every]
    assert shapes == {
        "none": full[1:], "two": full[2:], "four": full, "negative": [full[0], full[2], full[3]],
        "tuple": [full[1], full[3]],
    }  # fmt: skip


def stage_calls(model: ResNet) -> list[int]:
    """Hooks recording which stages run (1-based indices)."""
    calls: list[int] = []
    for index, stage in enumerate(model.stages, start=1):
        stage.register_forward_hook(lambda m, args, out, index=index: calls.append(index))
    return calls


def test_stop_early_runs_no_later_stage() -> None:
    model = create_model("resnet20").eval()
    calls = stage_calls(model)
    x = images(side=16)
    with torch.no_grad():
        model.forward_intermediates(x, [1])
        assert calls == [1]
        calls.clear()
        model.forward_intermediates(x, [0])
        assert calls == []
        model.forward_intermediates(x, [1], stop_early=False)
        assert calls == [1, 2, 3]
        calls.clear()
        ResNetFeatures(model, out_indices=(0, 1))(x)
        assert calls == [1]
        calls.clear()
        ResNetFeatures(model, out_indices=2)(x)  # the last 2 indices: stages 2 and 3
        assert calls == [1, 2, 3]


def test_gradient_checkpointing_gives_the_same_intermediates_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """In training mode, with drop-path: the same maps and gradients with every block checkpointed, through
    `forward_intermediates` and through `ResNetFeatures` (which takes the flag from the network)."""
    checkpointed_blocks: list[nn.Module] = []
    real = resnet_module.checkpointed_call
    monkeypatch.setattr(
        resnet_module, "checkpointed_call", lambda block, x: checkpointed_blocks.append(block) or real(block, x)
    )
    torch.manual_seed(0)
    plain = create_model("resnet20", layers=(2, 2, 2), drop_path=0.2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    runs = {
        "plain": lambda x: plain.forward_intermediates(x, [0, 2]),
        "checkpointed": lambda x: checkpointed.forward_intermediates(x, [0, 2]),
        "plain_backbone": ResNetFeatures(plain, out_indices=[0, 2]),
        "checkpointed_backbone": ResNetFeatures(checkpointed, out_indices=[0, 2]),
    }
    results = {}
    for name, run in runs.items():
        torch.manual_seed(1)
        x = images(side=16).requires_grad_()
        outputs = run(x)
        sum(o.square().mean() for o in outputs).backward()
        net = plain if name.startswith("plain") else checkpointed
        grads = {n: p.grad for n, p in net.named_parameters()}
        results[name] = ([o.detach() for o in outputs], x.grad, grads)
        net.zero_grad(set_to_none=True)
    assert len(checkpointed_blocks) == 2 * 4  # stop_early: the 4 blocks of stages 1-2, in two runs
    assert {id(b) for b in checkpointed_blocks} == {id(b) for stage in checkpointed.stages[:2] for b in stage}
    for left, right in (("plain", "checkpointed"), ("plain", "plain_backbone"), ("plain", "checkpointed_backbone")):
        (outs, x_grad, grads), (outs2, x_grad2, grads2) = results[left], results[right]
        assert all(torch.equal(a, b) for a, b in zip(outs, outs2, strict=True)), right
        torch.testing.assert_close(x_grad2, x_grad, atol=1e-6, rtol=0)
        assert grads.keys() == grads2.keys()
        for name, grad in grads.items():
            if name.startswith(("stages.2.", "head.")):  # after the deepest index: never run
                assert grad is None and grads2[name] is None, name
            else:
                assert grad is not None and grad.abs().sum() > 0, name
                torch.testing.assert_close(grads2[name], grad, atol=1e-6, rtol=0, msg=name)


def test_reset_classifier_changes_only_the_classifier() -> None:
    model = create_model("resnet20").eval().double()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    x = images(side=16).double()
    model.reset_classifier(7)
    assert isinstance(model.head.fc, nn.Linear)
    assert (model.head.fc.in_features, model.head.fc.out_features) == (64, 7)
    assert model.head.fc.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert isinstance(model.head.fc, nn.Identity)
        pooled = model(x)
        assert pooled.shape == (2, model.num_features) == (2, 64)
        torch.testing.assert_close(pooled, model.forward_features(x).mean(dim=(2, 3)))
        model.reset_classifier(3)  # again from no classifier
        assert model(x).shape == (2, 3)
        assert model.head.fc.weight.dtype == torch.float64
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ModelConfigError, match=r"num_classes must be >= 0 .*got -1$"):
        model.reset_classifier(-1)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([4], r"^indices=\[4\]: 4 is not a feature index; valid indices are 0\.\.3 \(0 = stem, 1\.\.3 = stages\) or "
              r"-4\.\.-1 from the end$"),
        ([1, -5], r"^indices=\[1, -5\]: -5 is not a feature index; valid indices are 0\.\.3"),
        ([1.0], r"1\.0 is not a feature index"),
        (0, r"^indices=0: an int takes the last n feature indices, so it must be in 1\.\.4 \(the stem and 3 stages\)$"),
        (5, r"^indices=5: an int takes the last n feature indices, so it must be in 1\.\.4"),
        ([], r"^indices is empty"),
    ],
)  # fmt: skip
def test_a_bad_index_is_a_clear_error(indices: Any, message: str) -> None:
    model = create_model("resnet20")
    with pytest.raises(ModelConfigError, match=message):
        model.forward_intermediates(images(side=8), indices)


def test_create_model_errors_name_the_argument() -> None:
    with pytest.raises(ModelConfigError, match=r"^out_indices=\[5\]: 5 is not a feature index; valid .* 0\.\.4 "):
        create_model("resnet18", features_only=True, out_indices=[5])
    with pytest.raises(ModelConfigError, match=r"^out_indices=\(1, 2\) needs features_only=True"):
        create_model("resnet18", out_indices=(1, 2))
    with pytest.raises(ModelConfigError, match=r"^out_indices=\(1, 2\) needs features_only=True"):
        create_model("resnet18", features_only=False, out_indices=(1, 2))


@pytest.fixture
def isolated_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register models without leaking them into other tests."""
    MODELS.names()  # load plugins first, so they are part of the snapshot
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))
    monkeypatch.setattr(MODELS, "_origins", dict(MODELS._origins))


def test_features_only_on_a_custom_factory(isolated_models: None) -> None:
    """A factory returning a ResNet (or subclass) gets a backbone; one returning another module, a clear error."""
    MODELS.register("rltest_linear")(lambda **overrides: nn.Linear(4, 2))
    MODELS.register("rltest_small")(lambda **kw: create_model("resnet20", **{"widths": (16, 16, 32), **kw}))
    with pytest.raises(
        ModelConfigError,
        match=r"^features_only=True needs a resnet_lit ResNet \(with forward_intermediates\), but model "
        r"'rltest_linear' builds a Linear; ",
    ):
        create_model("rltest_linear", features_only=True)
    assert isinstance(create_model("rltest_linear"), nn.Linear)
    backbone = create_model("rltest_small", features_only=True, out_indices=1)  # the last index
    assert backbone.channels() == [32]
    assert "rltest_linear" in MODELS.names()


def test_isolated_models_did_not_leak() -> None:
    assert "rltest_linear" not in MODELS.names()


def test_backbone_state_dict_is_the_networks_minus_head_and_unused_stages() -> None:
    """A full network's weights load into the backbone with strict=False (nothing missing) and reproduce the
    network's feature maps."""
    torch.manual_seed(0)
    network = create_model("resnet18", num_classes=5)
    with torch.no_grad():  # BatchNorm statistics that differ from a fresh network's
        network.train()(images(side=32, batch=4, seed=1))
    network.eval()
    torch.manual_seed(1)
    backbone = create_model("resnet18", features_only=True, out_indices=(0, 2)).eval()
    network_keys, backbone_keys = set(network.state_dict()), set(backbone.state_dict())
    assert backbone_keys < network_keys
    unused = ("head.", "stages.2.", "stages.3.")
    assert network_keys - backbone_keys == {k for k in network_keys if k.startswith(unused)}
    x = images(side=32)
    with torch.no_grad():
        expected = network.forward_intermediates(x, (0, 2))
        assert not torch.equal(backbone(x)[1], expected[1])
        result = backbone.load_state_dict(network.state_dict(), strict=False)
        assert result.missing_keys == []
        assert set(result.unexpected_keys) == network_keys - backbone_keys
        features = backbone(x)
    assert len(features) == 2
    assert all(torch.equal(f, e) for f, e in zip(features, expected, strict=True))


def test_backbone_and_intermediates_compile_without_graph_breaks() -> None:
    """`torch.compile` of a checkpointed backbone in training, and of `forward_intermediates`, in one graph each."""
    dynamo = pytest.importorskip("torch._dynamo")
    backbone = create_model("resnet20", features_only=True, out_indices=(0, 2), layers=(1, 1, 1)).train()
    backbone.set_grad_checkpointing()
    network = create_model("resnet20", layers=(1, 1, 1)).eval()
    for run in (backbone, lambda x: network.forward_intermediates(x, [1, -1])):
        dynamo.reset()
        explanation = dynamo.explain(run)(images(side=16))
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        assert explanation.graph_count == 1
