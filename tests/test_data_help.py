"""`resnet-lit fit --data.help <DataModule>` lists every argument of every DataModule with its type and default,
also the shared loader knobs that subclasses only forward through ``**kwargs``."""

from __future__ import annotations

import re

import pytest

from resnet_lit.cli import main

OPTIONAL_SEQUENCE = ("Optional[Sequence[float]]", "null")
SHARED = {  # declared once, in ImageDataModule
    "batch_size": ("int", "128"),
    "eval_batch_size": ("int | null", "null"),
    "num_workers": ("int", "0"),
    "pin_memory": ("bool", "True"),
    "persistent_workers": ("bool", "False"),
    "drop_last": ("bool", "True"),
    "balanced_sampling": ("bool", "False"),
    "val_fraction": ("float", "0.0"),
    "seed": ("int", "0"),
    "augment": ("Literal['none', 'trivialaugment', 'randaugment']", "none"),
    "random_erasing": ("float", "0.0"),
    "mean": OPTIONAL_SEQUENCE,
    "std": OPTIONAL_SEQUENCE,
    "predict_dir": ("str | null", "null"),
    "skip_corrupt": ("bool", "False"),
    "loader": ("Literal['auto', 'dataloader', 'device']", "auto"),
    "device_memory_fraction": ("float", "0.25"),
}
TORCHVISION = {"data_dir": ("str", "data"), "download": ("bool", "False")}
MNIST = {**TORCHVISION, "image_size": ("int | null", "null"), "val_fraction": ("float", str(1 / 12))}
CIFAR = {**TORCHVISION, "image_size": ("int", "32")}
SYNTHETIC = {name: ("int", str(default)) for name, default in [
    ("num_classes", 10), ("in_channels", 3), ("image_size", 32), ("num_samples", 1024), ("num_val_samples", 256),
    ("num_test_samples", 256)]}  # fmt: skip
EXPECTED = {  # own arguments and subclass defaults; None: a knob the DataModule fixes itself
    "CIFAR10DataModule": CIFAR,
    "CIFAR100DataModule": CIFAR,
    "MNISTDataModule": MNIST,
    "FashionMNISTDataModule": MNIST,
    "DigitsDataModule": {
        "val_fraction": ("float", "0.15"),
        "test_fraction": ("float", "0.15"),
        "image_size": ("int | null", "null"),
        "batch_size": ("int", "64"),
    },
    "ImageFolderDataModule": {
        "root": ("str", None),
        "transform_style": ("Literal['imagenet', 'cifar']", "imagenet"),
        "image_size": ("int", "224"),
        "resize_size": ("int | null", "null"),
        "skip_corrupt": ("bool", "False"),
        "val_fraction": ("float", "0.1"),
    },
    "SyntheticDataModule": {**SYNTHETIC, "val_fraction": None, "mean": None, "std": None},
}


def _listed(help_text: str) -> dict[str, tuple[str, str | None]]:
    """``{argument: (type, default)}`` of the `--data.<argument>` entries of a help text."""
    listed = {}
    for entry in re.split(r"\n  (?=--data\.)", help_text)[1:]:
        entry = " ".join(entry.split())
        name = re.match(r"--data\.(\w+)", entry)
        described = re.search(r"\((?:required, )?type: (.*?)(?:, default: (.*))?\)$", entry)
        assert name and described, f"no type/default in the help entry {entry!r}"
        listed[name[1]] = (described[1], described[2])
    return listed


@pytest.mark.parametrize("name", EXPECTED)
def test_data_help_lists_every_argument_with_type_and_default(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.help", f"resnet_lit.data.{name}"])
    assert exit_info.value.code in (0, None)
    expected = {**SHARED, **EXPECTED[name]}
    expected = {argument: listing for argument, listing in expected.items() if listing is not None}
    assert _listed(capsys.readouterr().out) == expected
