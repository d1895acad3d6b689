"""User-defined blocks and models: dotted paths, decorators and entry-point plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resnet_lit
from resnet_lit import ResidualBlock, create_model, list_models, register_block, register_model
from resnet_lit.cli import main
from resnet_lit.models import (
    ACT_LAYERS,
    BLOCKS,
    MODELS,
    NORM_LAYERS,
    SHORTCUTS,
    STEMS,
    ModelConfigError,
    register_shortcut,
    register_stem,
)
from resnet_lit.registry import PluginCollisionWarning, Registry

USER_BLOCK_SOURCE = '''
from torch import nn

from resnet_lit import ResidualBlock


class {name}(ResidualBlock):
    """One 3x3 convolution and a norm as the residual branch."""

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, *, norm_layer=nn.BatchNorm2d, **kwargs):
        super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kwargs)
        self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn_last = norm_layer(channels)

    def residual(self, x):
        return self.bn_last(self.conv(x))
'''


@pytest.fixture
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register parts without leaking them into other tests."""
    for registry in (BLOCKS, MODELS, STEMS, SHORTCUTS, NORM_LAYERS, ACT_LAYERS):
        registry.names()  # load plugins first, so they are part of the snapshot
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_origins", dict(registry._origins))


class NoBnLastBlock(ResidualBlock):
    """A user block whose last layer is not called `bn_last`."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)
        self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ZeroInitBlock(NoBnLastBlock):
    """The same block supporting zero_init_residual by overriding zero_init_last()."""

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)


# --------------------------------------------------------------------------- dotted path and decorator


def test_block_by_dotted_class_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rltest_usermod.py").write_text(USER_BLOCK_SOURCE.format(name="MyBlock"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rltest_usermod", raising=False)

    model = create_model("resnet20", block="rltest_usermod.MyBlock")
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 9
    assert all(type(b).__name__ == "MyBlock" for b in blocks)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Mixed with built-in blocks per stage.
    model = create_model("resnet20", block=["basic", "rltest_usermod.MyBlock", "basic"])
    assert type(model.stages[1][0]).__name__ == "MyBlock"


def test_dotted_path_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"Cannot import block 'rltest_nosuchmodule\.Block'"):
        create_model("resnet20", block="rltest_nosuchmodule.Block")
    with pytest.raises(ValueError, match=r"has no block named 'NoSuchBlock'"):
        create_model("resnet20", block="resnet_lit.models.blocks.NoSuchBlock")
    with pytest.raises(ValueError, match=r"'torch\.nn\.Linear' is not a resnet_lit\.ResidualBlock subclass"):
        create_model("resnet20", block="torch.nn.Linear")


def test_register_block_decorator(isolated_registries: None, capsys: pytest.CaptureFixture[str]) -> None:
    @register_block("rltest_tiny")
    class TinyBlock(ResidualBlock):
        def __init__(self, in_channels: int, channels: int, stride: int = 1, *, norm_layer=nn.BatchNorm2d, **kw):
            super().__init__(in_channels, channels, stride, norm_layer=norm_layer, **kw)
            self.conv = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
            self.bn_last = norm_layer(channels)

        def residual(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_last(self.conv(x))

    model = create_model("resnet18", block="rltest_tiny", layers=(1, 1, 1, 1), num_classes=4)
    assert all(isinstance(stage[0], TinyBlock) for stage in model.stages)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)

    main(["blocks", "rltest_*"])
    line = capsys.readouterr().out.strip()
    assert line.split()[:2] == ["rltest_tiny", "user"]
    assert line.endswith("TinyBlock")


def test_registering_a_different_object_under_a_taken_name_fails(isolated_registries: None) -> None:
    class Other(ResidualBlock):
        pass

    with pytest.raises(ValueError, match=r"block 'basic' is already registered \(built-in\)"):
        register_block("basic")(Other)
    # Registering the same object again is harmless.
    register_block("basic")(resnet_lit.BasicBlock)


def test_register_model_decorator(isolated_registries: None, capsys: pytest.CaptureFixture[str]) -> None:
    @register_model("rltest_net")
    def rltest_net(**overrides):
        return create_model("resnet20", **{"num_classes": 3, **overrides})

    assert list_models("rltest_*") == ["rltest_net"]
    with torch.no_grad():
        assert create_model("rltest_net")(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        assert create_model("rltest_net", num_classes=5)(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    main(["describe", "rltest_net"])
    out = capsys.readouterr().out
    assert out.startswith("rltest_net @ 3x32x32")
    assert "head" in out


def test_describe_rejects_a_model_that_is_not_a_resnet(isolated_registries: None) -> None:
    register_model("rltest_linear")(lambda **overrides: nn.Linear(4, 2))
    with pytest.raises(SystemExit, match="describe supports ResNet models; 'rltest_linear' builds a Linear"):
        main(["describe", "rltest_linear"])


def test_zero_init_residual_on_a_block_without_bn_last_is_a_clear_error() -> None:
    create_model("resnet20", block=NoBnLastBlock)  # fine without zero_init_residual
    with pytest.raises(NotImplementedError, match=r"NoBnLastBlock has no `bn_last`.*zero_init_last\(\)"):
        create_model("resnet20", block=NoBnLastBlock, zero_init_residual=True)


def test_zero_init_residual_uses_an_overridden_zero_init_last() -> None:
    model = create_model("resnet20", block=ZeroInitBlock, zero_init_residual=True).eval()
    block = model.stages[0][1]
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)


# --------------------------------------------------------------------------- origins and plugin collisions

BUILT_IN_NAMES = [
    (BLOCKS, "basic"), (MODELS, "resnet50"), (STEMS, "imagenet"), (SHORTCUTS, "conv_bn"),
    (NORM_LAYERS, "batchnorm"), (ACT_LAYERS, "relu"),
]  # fmt: skip


@pytest.mark.parametrize(("registry", "name"), BUILT_IN_NAMES, ids=[r.kind for r, _ in BUILT_IN_NAMES])
def test_built_in_entries_are_labelled_built_in(registry: Registry[Any], name: str) -> None:
    assert registry.origin(name) == "built-in"


def test_every_register_helper_labels_its_entries_user(isolated_registries: None) -> None:
    register_block("rltest_block")(NoBnLastBlock)
    register_model("rltest_model")(lambda **overrides: create_model("resnet20", **overrides))
    register_stem("rltest_stem")(lambda i, o, norm, act: nn.Conv2d(i, o, 3, padding=1))
    register_shortcut("rltest_shortcut")(lambda i, o, stride, norm: nn.Conv2d(i, o, 1, stride))
    NORM_LAYERS.register("rltest_norm")(nn.BatchNorm2d)
    for registry, name in [(BLOCKS, "rltest_block"), (MODELS, "rltest_model"), (STEMS, "rltest_stem"),
                           (SHORTCUTS, "rltest_shortcut"), (NORM_LAYERS, "rltest_norm")]:  # fmt: skip
        assert registry.origin(name) == "user", registry.kind
    model = create_model("rltest_model", block="rltest_block", stem="rltest_stem", shortcut="rltest_shortcut")
    assert type(model.stages[0][0]) is NoBnLastBlock
    assert type(model.stages[1][0].shortcut) is nn.Conv2d


@dataclass
class FakeDistribution:
    name: str


@dataclass
class FakeEntryPoint:
    """What `importlib.metadata.entry_points` yields, for a plugin that need not be installed."""

    name: str
    obj: object
    dist: FakeDistribution
    value: str = "rltest_fake:obj"

    def load(self) -> object:
        return self.obj


InstallPlugins = Callable[..., None]


@pytest.fixture
def fake_block_plugins(isolated_registries: None, monkeypatch: pytest.MonkeyPatch) -> InstallPlugins:
    """Returns a function that makes BLOCKS read the given entry points (and only those) on its next lookup."""

    def install(*eps: FakeEntryPoint) -> None:
        monkeypatch.setattr(
            "resnet_lit.registry.entry_points", lambda group: list(eps) if group == BLOCKS.entry_point_group else []
        )
        monkeypatch.setattr(BLOCKS, "_plugins_loaded", False)

    return install


def test_a_plugin_colliding_with_an_existing_name_is_ignored_with_a_warning(fake_block_plugins: InstallPlugins) -> None:
    register_block("rltest_mine")(ZeroInitBlock)
    fake_block_plugins(
        FakeEntryPoint("basic", NoBnLastBlock, FakeDistribution("my-blocks")),
        FakeEntryPoint("rltest_mine", NoBnLastBlock, FakeDistribution("my-blocks")),
        FakeEntryPoint("rltest_new", NoBnLastBlock, FakeDistribution("my-blocks")),
        FakeEntryPoint("rltest_same", ZeroInitBlock, FakeDistribution("other-blocks")),
    )
    register_block("rltest_same")(ZeroInitBlock)  # the plugin's module used the decorator as well
    with pytest.warns(PluginCollisionWarning) as record:
        names = BLOCKS.names("*")
    messages = [str(w.message) for w in record]
    assert messages == [
        "resnet-lit: block plugin 'basic' from package my-blocks is ignored: 'basic' is already registered (built-in)",
        "resnet-lit: block plugin 'rltest_mine' from package my-blocks is ignored: 'rltest_mine' is already "
        "registered (user)",
    ]
    assert BLOCKS.get("basic") is resnet_lit.BasicBlock
    assert BLOCKS.origin("basic") == "built-in"
    assert BLOCKS.get("rltest_mine") is ZeroInitBlock
    assert BLOCKS.origin("rltest_mine") == "user"
    assert {"rltest_new", "rltest_same"} <= set(names)
    assert BLOCKS.origin("rltest_new") == "plugin my-blocks"
    assert BLOCKS.origin("rltest_same") == "plugin other-blocks"


def test_a_plugin_without_a_collision_loads_silently(fake_block_plugins: InstallPlugins) -> None:
    fake_block_plugins(FakeEntryPoint("rltest_quiet", ZeroInitBlock, FakeDistribution("my-blocks")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BLOCKS.get("rltest_quiet") is ZeroInitBlock


class GainBlock(NoBnLastBlock):
    """A plugin block with its own option."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *, gain: float = 1.0, **kwargs) -> None:
        super().__init__(in_channels, channels, stride, **kwargs)
        self.gain = gain


def test_plugin_blocks_take_options_checked_like_any_block(fake_block_plugins: InstallPlugins) -> None:
    fake_block_plugins(FakeEntryPoint("rltest_gain", GainBlock, FakeDistribution("my-blocks")))
    model = create_model("resnet20", block="rltest_gain", block_args={"gain": 0.5})
    assert {block.gain for stage in model.stages for block in stage} == {0.5}
    with pytest.raises(ModelConfigError, match=r"^block 'rltest_gain' \(GainBlock\) has no option\(s\) gian; "
                                               r"valid options: gain$"):  # fmt: skip
        create_model("resnet20", block="rltest_gain", block_args={"gian": 0.5})


# --------------------------------------------------------------------------- entry-point plugins

PLUGIN_DIST = "rltestplugin"
BROKEN_DIST = "rltestbroken"


def _write_plugin_packages(root: Path) -> tuple[Path, Path]:
    good = root / PLUGIN_DIST
    (good / "rltest_plugpkg").mkdir(parents=True)
    (good / "pyproject.toml").write_text(
        textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{PLUGIN_DIST}"
        version = "0.0.1"

        [project.entry-points."resnet_lit.blocks"]
        myblock = "rltest_plugpkg.blocks:MyBlock"

        [project.entry-points."resnet_lit.models"]
        plugnet = "rltest_plugpkg.blocks:plugnet"

        [tool.setuptools]
        packages = ["rltest_plugpkg"]
    ''')
    )
    (good / "rltest_plugpkg" / "__init__.py").write_text("")
    (good / "rltest_plugpkg" / "blocks.py").write_text(
        USER_BLOCK_SOURCE.format(name="MyBlock")
        + textwrap.dedent("""

            def plugnet(**overrides):
                from resnet_lit import create_model

                return create_model("resnet20", **{"block": "myblock", "num_classes": 6, **overrides})
        """)
    )

    broken = root / BROKEN_DIST
    (broken / "rltest_brokenpkg").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(
        textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{BROKEN_DIST}"
        version = "0.0.1"

        [project.entry-points."resnet_lit.blocks"]
        brokenblock = "rltest_brokenpkg.broken:Block"

        [project.entry-points."resnet_lit.models"]
        brokennet = "rltest_brokenpkg.broken:net"

        [tool.setuptools]
        packages = ["rltest_brokenpkg"]
    ''')
    )
    (broken / "rltest_brokenpkg" / "__init__.py").write_text("")
    (broken / "rltest_brokenpkg" / "broken.py").write_text('raise RuntimeError("rltest plugin fails on purpose")\n')
    return good, broken


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Install a working and a broken plugin distribution into this venv; uninstall them afterwards."""
    pytest.importorskip("setuptools")
    # This process has read its entry points already, so it never imports the temporary plugins.
    BLOCKS.names()
    MODELS.names()
    good, broken = _write_plugin_packages(tmp_path_factory.mktemp("plugins"))
    try:
        result = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(good), str(broken))
        assert result.returncode == 0, result.stdout + result.stderr
        yield
    finally:
        result = _pip("uninstall", "-y", "-q", PLUGIN_DIST, BROKEN_DIST)
        assert result.returncode == 0, result.stdout + result.stderr


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run in a fresh interpreter, so the entry points are read anew."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_entry_point_plugins(installed_plugins: None) -> None:
    blocks = _run("-m", "resnet_lit", "blocks")
    assert blocks.returncode == 0, blocks.stderr
    rows = {line.split()[0]: line.split()[1:] for line in blocks.stdout.splitlines()}
    assert rows["myblock"] == ["plugin", PLUGIN_DIST, "rltest_plugpkg.blocks.MyBlock"]
    assert rows["basic"][0] == "built-in"
    assert "brokenblock" not in rows
    assert "'brokenblock'" in blocks.stderr
    assert BROKEN_DIST in blocks.stderr

    # `resnet-lit models` and create_model in one fresh interpreter (each start costs seconds).
    script = textwrap.dedent("""
        import torch
        import resnet_lit
        from resnet_lit.cli import main

        main(["models"])
        print("---")
        model = resnet_lit.create_model("resnet20", block="myblock")
        assert type(model.stages[0][0]).__name__ == "MyBlock"
        print(tuple(model(torch.randn(2, 3, 32, 32)).shape))
        print(tuple(resnet_lit.create_model("plugnet", num_classes=4)(torch.randn(1, 3, 32, 32)).shape))
    """)
    result = _run("-c", script)
    assert result.returncode == 0, result.stderr
    models_out, built_out = result.stdout.split("---\n")
    names = models_out.split()
    assert "plugnet" in names
    assert "resnet50" in names
    assert "brokennet" not in names
    assert "PluginLoadWarning" in result.stderr
    assert "'brokennet'" in result.stderr
    assert BROKEN_DIST in result.stderr
    assert "rltest plugin fails on purpose" in result.stderr
    assert built_out.split("\n")[:2] == ["(2, 10)", "(1, 4)"]
