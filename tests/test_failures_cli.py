"""The CLI under bad input: every user-fixable error is one `resnet-lit: error:` line without a traceback,
`--ckpt_path` takes only what nobody set from the checkpoint, `weights_only: false` warns, and a run that
fails before it starts leaves the run's config.yaml alone.

Checkpoints here are built, not trained: a network's weights and hyperparameters, as a resnet-lit run saves them.
"""

from __future__ import annotations

import fractions
import warnings
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from resnet_lit import ResNetClassifier
from resnet_lit.cli import main
from resnet_lit.data import SyntheticDataModule
from resnet_lit.data.errors import CorruptImageError, DataConfigError
from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpoint_io import CheckpointMismatchError
from resnet_lit.fault_tolerance.cluster import ClusterConfigError
from resnet_lit.fault_tolerance.nonfinite import NonFiniteLossError
from resnet_lit.models.errors import ModelConfigError
from resnet_lit.registry import RegistryError
from resnet_lit.training_cli import ResNetLitCLI

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DIGITS = ["--data", "resnet_lit.data.DigitsDataModule", "--data.batch_size", "64"]
# What the built checkpoint was "trained" with; the digits give 1 channel and 10 classes.
SAVED = {"arch": "resnet32", "label_smoothing": 0.2, "nonfinite_loss": "skip", "mixup_alpha": 0.3}


class RaisingDataModule(SyntheticDataModule):
    """A user's DataModule that rejects its arguments with a ResNetLitError (jsonargparse wraps it)."""

    def __init__(self, **kwargs: object) -> None:
        raise ResNetLitError("my_root: no such folder '/nowhere'")


def _save_checkpoint(path: Path, **hparams: object) -> Path:
    model = ResNetClassifier(num_classes=10, in_channels=1, class_names=[str(i) for i in range(10)], **hparams)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run" / "checkpoints" / "last.ckpt", **SAVED)


def _error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expecting it to fail; the error text it ends with (no traceback allowed)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code = exit_info.value.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    return code if isinstance(code, str) else err.strip().splitlines()[-1]


# --- defect 1: generic printing of ResNetLitError -----------------------------------------------------------
def test_the_package_user_errors_are_resnetliterrors_with_their_old_bases() -> None:
    for error, base in [(RegistryError, ValueError), (ModelConfigError, ValueError), (DataConfigError, ValueError),
                        (CorruptImageError, RuntimeError), (ClusterConfigError, RuntimeError),
                        (CheckpointMismatchError, RuntimeError), (NonFiniteLossError, RuntimeError)]:  # fmt: skip
        assert issubclass(error, ResNetLitError) and issubclass(error, base), error


def test_user_errors_are_found_through_causes_contexts_and_worker_reraises() -> None:
    from resnet_lit.cli import _original_message, _user_error

    cause = ResNetLitError("data.root: no such folder '/x'")
    wrapped = ValueError("Does not validate against any of the Union subtypes")  # what jsonargparse raises
    wrapped.__cause__ = cause
    assert _user_error(wrapped) is cause
    during = RuntimeError("raised while handling")
    during.__context__ = wrapped
    assert _user_error(during) is cause
    assert _user_error(ValueError("a bug")) is None
    # torch re-raises a worker's exception as the same type, its message holding the worker's traceback
    worker = CorruptImageError(
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\nresnet_lit.data.errors.CorruptImageError: cannot decode image file 'a.jpg'\n"
    )
    assert _original_message(_user_error(worker)) == "cannot decode image file 'a.jpg'"


def test_a_resnetliterror_of_a_users_class_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(["fit", "--data", f"{__name__}.RaisingDataModule",
                        "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    assert line == "resnet-lit: error: my_root: no such folder '/nowhere'"


# --- defect 5: one line instead of a traceback or a page of usage -------------------------------------------
def _bad_yaml(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("batch_size", ["batch_size", "0"]),
        ("block_list", ["block lists 2 entries", "3 stages"]),
        ("strides", ["strides=[1, 2] (2)"]),
        ("image_size", ["image_size", "0"]),
        ("empty_yaml", ["empty.yaml", "empty"]),
        ("list_yaml", ["list.yaml", "list"]),
        ("equals_config", ["broken.yaml", "not valid YAML"]),
        ("unknown_cli_key", ["unknown key 'model.arhc'", "did you mean model.arch?"]),
        ("unknown_yaml_key", ["unknown key 'trainer.max_epoch'", "trainer.max_epochs"]),
        ("unknown_nested_key", ["unknown key 'model.net.layres'", "did you mean model.net.layers?"]),
    ],
)
def test_bad_input_is_one_error_line(
    case: str, needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET]
    args = {
        "batch_size": [*fit, "--data.init_args.batch_size", "0"],
        "block_list": [*fit, "--model.net.block", "[basic, basic]"],
        "strides": [*fit, "--model.net.strides", "[1, 2]"],
        "image_size": ["fit", "--data", "resnet_lit.data.SyntheticDataModule", "--data.image_size", "0",
                       "--trainer.default_root_dir", str(tmp_path / "run")],
        "empty_yaml": ["fit", "--config", _bad_yaml(tmp_path, "empty.yaml", "")],
        "list_yaml": ["fit", "--config=" + _bad_yaml(tmp_path, "list.yaml", "- a\n- b\n")],
        "equals_config": ["fit", "--config=" + _bad_yaml(tmp_path, "broken.yaml", "trainer: [1,\n")],
        "unknown_cli_key": [*fit, "--model.arhc", "resnet20"],
        "unknown_yaml_key": [*fit, "--config", _bad_yaml(tmp_path, "typo.yaml", "trainer:\n  max_epoch: 3\n")],
        "unknown_nested_key": [*fit, "--model.net.layres", "[1, 1, 1]"],
    }[case]  # fmt: skip
    line = _error_line(args, capsys)
    assert line.startswith("resnet-lit: error: ") and "\n" not in line, line
    assert all(needle in line for needle in needles), line


def test_images_smaller_than_the_network_stride_warn() -> None:
    args = ["--data", "resnet_lit.data.SyntheticDataModule", "--data.image_size", "1", "--data.num_samples", "8",
            "--model.arch", "resnet18"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"1x1 images are smaller than the network's total stride 32"):
        ResNetLitCLI(args=args, run=False)


# --- defect 2: --ckpt_path fills only what nobody set ------------------------------------------------------
def test_lightning_still_has_the_replaced_ckpt_path_hook() -> None:
    # ResNetLitCLI replaces this private LightningCLI method; if Lightning renames it, the override is dead code
    # and the checkpoint's hyperparameters silently win again.
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert ResNetLitCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def _place(saved_checkpoint: Path, tmp_path: Path, form: str) -> tuple[Path, str]:
    """A run folder and the --ckpt_path value: the built checkpoint by name, or as the folder's last.ckpt."""
    root = tmp_path / "run"
    if form == "file":
        return root, str(saved_checkpoint)
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(saved_checkpoint.read_bytes())
    return root, "last"


@pytest.mark.parametrize("form", ["file", "last"])
def test_ckpt_path_precedence_defaults_checkpoint_config_command_line(
    saved_checkpoint: Path, tmp_path: Path, form: str
) -> None:
    root, ckpt_path = _place(saved_checkpoint, tmp_path, form)
    config = tmp_path / "eval.yaml"
    config.write_text("model:\n  label_smoothing: 0.05\n")
    cli = ResNetLitCLI(args=["validate", *DIGITS, "--config", str(config), "--ckpt_path", ckpt_path,
                             "--model.nonfinite_loss", "stop", "--trainer.limit_val_batches", "1",
                             "--trainer.default_root_dir", str(root), *QUIET])  # fmt: skip
    hparams = cli.model.hparams
    assert hparams.arch == "resnet32"  # nobody set it: the checkpoint's network is built
    assert hparams.mixup_alpha == 0.3  # nobody set it: the checkpoint's
    assert hparams.label_smoothing == 0.05  # a config file beats the checkpoint
    assert hparams.nonfinite_loss == "stop"  # the command line beats the checkpoint
    assert (root / "config.yaml").is_file()  # the run started, so its config is written


@pytest.mark.parametrize("form", ["file", "last"])
def test_ckpt_path_that_does_not_fit_the_requested_network_lists_the_mismatch(
    saved_checkpoint: Path, tmp_path: Path, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, ckpt_path = _place(saved_checkpoint, tmp_path, form)
    message = _error_line(["validate", *DIGITS, "--ckpt_path", ckpt_path, "--model.arch", "resnet20",
                           "--trainer.default_root_dir", str(root), *QUIET], capsys)  # fmt: skip
    assert message.startswith("resnet-lit: error: the checkpoint does not fit this model's architecture")
    assert "key(s) of the checkpoint not in the model" in message and "arch='resnet32'" in message


# --- defect 4: config.yaml is written once the run has started ---------------------------------------------
def test_a_failed_resume_leaves_config_yaml_byte_identical(
    saved_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = _place(saved_checkpoint, tmp_path, "last")
    before = b"# the config of the run that wrote last.ckpt\nmodel:\n  arch: resnet32\n"
    (root / "config.yaml").write_bytes(before)
    message = _error_line(["fit", *DIGITS, "--ckpt_path", "last", "--model.arch", "resnet20",
                           "--trainer.default_root_dir", str(root), *QUIET], capsys)  # fmt: skip
    assert "does not fit" in message
    assert (root / "config.yaml").read_bytes() == before


# --- defect 3: weights_only: false warns, every time, naming the file -------------------------------------
def test_weights_only_false_warns_naming_the_file_it_unpickles(saved_checkpoint: Path, tmp_path: Path) -> None:
    root, _ = _place(saved_checkpoint, tmp_path, "last")
    last = root / "checkpoints" / "last.ckpt"
    args = ["validate", *DIGITS, "--model.arch", "resnet32", "--ckpt_path", "last", "--weights_only", "false",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root), *QUIET]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: a repeated warning is shown once
        for _ in range(2):
            ResNetLitCLI(args=args)
    said = [str(w.message) for w in caught if "weights_only is false" in str(w.message)]
    assert len(said) == 2, said  # each run says it
    assert all(f"weights_only is false, so {last} is unpickled in full" in text for text in said)


def test_init_from_never_unpickles_even_with_weights_only_false(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "payload": fractions.Fraction(1, 3)}, planted)  # not loadable with weights_only=True
    message = _error_line(["fit", *DIGITS, "--model.init_from", str(planted), "--weights_only", "false",
                           "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET], capsys)  # fmt: skip
    assert "unpickling" in message
