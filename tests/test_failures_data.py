"""Issue 10, data and predict: symlink loops, predict's output file, non-UTF-8 names and corrupt images in predict,
missing torchvision files, a last training batch of one sample, non-positive sizes. Every error is a one-line
ResNetLitError naming the key, value, file or folder."""

from __future__ import annotations

import csv
import errno
import os
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from fakedata import write_image_folder
from resnet_lit.callbacks import prediction_writer
from resnet_lit.cli import main
from resnet_lit.data import (
    CIFAR10DataModule,
    DataConfigError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from resnet_lit.data.backends import DataLoaderBackend, DeviceBackend, LoaderSettings, Placement
from resnet_lit.data.transforms import ImagePipeline
from resnet_lit.errors import ResNetLitError

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# --- symlink loops --------------------------------------------------------------------------------------------------
def test_symlink_loop_in_a_class_folder_is_named_and_never_mislabels(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2, size=8)
    (root / "train" / "cat" / "loop").symlink_to("..")  # train/cat/loop -> train: would list dog images as cats
    extra = write_image_folder(tmp_path / "elsewhere", classes=("more",), per_class=1, size=8) / "train" / "more"
    (root / "train" / "cat" / "more").symlink_to(extra)  # a link that is no loop is still followed ...
    (root / "train" / "cat" / "again").symlink_to(extra)  # ... once, also through a second link

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = ImageFolderDataModule(str(root), image_size=8, val_fraction=0.0)
        samples = dm.splits().train.samples
    by_class = {name: sorted(Path(p).name for p, t in samples if dm.class_names[t] == name) for name in ("cat", "dog")}
    assert by_class == {"cat": ["0000.jpg", "0000.jpg", "0001.jpg"], "dog": ["0000.jpg", "0001.jpg"]}
    dog_folder = os.path.realpath(root / "train" / "dog")
    assert not [p for p, t in samples if t == 0 and os.path.realpath(p).startswith(dog_folder)]  # no dog as a cat
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("symlink loop: ") and repr(str(root / "train" / "cat" / "loop")) in m for m in messages)


def test_a_class_folder_that_links_to_its_split_folder_is_no_class(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2, size=8)
    (root / "train" / "all").symlink_to(".")  # a "class" holding every image of the split
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = ImageFolderDataModule(str(root), image_size=8, val_fraction=0.0)
        assert dm.class_names == ["cat", "dog"]
    assert len(dm.splits().train) == 4
    assert [str(w.message) for w in caught if "symlink loop" in str(w.message)] == [
        f"symlink loop: {str(root / 'train' / 'all')!r} points to {str(root / 'train')!r}, which contains it; "
        "not followed (remove the link)"
    ]


def test_symlink_loop_in_the_predict_folder_lists_each_image_once(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    nested = tmp_path / "predict" / "a" / "b"
    nested.mkdir(parents=True)
    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(nested / f"{i}.png")
    (nested / "up").symlink_to("../..")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = DigitsDataModule(predict_dir=str(tmp_path / "predict"), eval_batch_size=8)
        paths = [p for _, batch_paths in dm.predict_dataloader() for p in batch_paths]
    assert sorted(Path(p).name for p in paths) == ["0.png", "1.png"]
    assert any(str(w.message).startswith(f"symlink loop: {str(nested / 'up')!r}") for w in caught)


# --- predict: the output file, non-UTF-8 names, corrupt images ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A quickstart checkpoint after one training step: enough to predict with."""
    root = tmp_path_factory.mktemp("tiny-run")
    main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", "--trainer.logger", "false", *QUIET])  # fmt: skip
    return str(root / "checkpoints" / "last.ckpt")


def _predict(checkpoint: str, images: Path, output: Path, *args: str) -> None:
    main(["predict", "--config", QUICKSTART, "--ckpt_path", checkpoint, "--data.init_args.predict_dir", str(images),
          "--prediction_writer.output_path", str(output), "--trainer.default_root_dir", str(output.parent / "run"),
          "--trainer.logger", "false", *QUIET, *args])  # fmt: skip


def _error_line(run, capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error that the CLI prints for a failing `run`, which exits non-zero."""
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code not in (0, None)
    message = str(stop.value.code)
    assert "Traceback" not in capsys.readouterr().err
    assert message.startswith("resnet-lit: error: ") and "\n" not in message, message
    return message


def _digit_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("L", (8, 8), 30 * i).save(folder / f"{i}.png")
    return folder


def _rows(output: Path) -> list[dict[str, str]]:
    with open(output, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_predict_leaves_the_existing_output_untouched(
    tiny_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _digit_images(tmp_path / "images", 3)
    (images / "3.png").write_bytes(b"not an image")
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    output.write_text("earlier predictions\n")
    message = _error_line(lambda: _predict(tiny_checkpoint, images, output), capsys)
    assert "3.png" in message and "skip_corrupt: true" in message
    assert output.read_text() == "earlier predictions\n"
    assert _leftovers(output.parent) == []  # the temporary file is gone

    (images / "3.png").unlink()
    _predict(tiny_checkpoint, images, output)
    assert [Path(r["path"]).name for r in _rows(output)] == ["0.png", "1.png", "2.png"]
    assert _leftovers(output.parent) == []


def test_a_full_disk_during_predict_is_one_line_and_keeps_the_old_output(
    tiny_checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class FullDisk:
        def __init__(self, file: object) -> None:
            pass

        def writerow(self, row: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        writerows = writerow

    monkeypatch.setattr(prediction_writer, "csv", types.SimpleNamespace(writer=FullDisk))
    images = _digit_images(tmp_path / "images", 2)
    output = tmp_path / "predictions.csv"
    output.write_text("earlier predictions\n")
    message = _error_line(lambda: _predict(tiny_checkpoint, images, output), capsys)
    assert str(output) in message and os.strerror(errno.ENOSPC) in message
    assert output.read_text() == "earlier predictions\n"
    assert _leftovers(tmp_path) == []


def test_concurrent_writers_of_one_output_use_their_own_temporary_files(tmp_path: Path) -> None:
    output = str(tmp_path / "predictions.csv")
    first, second = prediction_writer.PendingFile(output), prediction_writer.PendingFile(output)
    assert first.temp != second.temp and os.path.dirname(first.temp) == str(tmp_path)
    first.file.write("first\n")
    second.file.write("second\n")
    first.commit()
    second.commit()
    assert Path(output).read_text() == "second\n" and _leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in names")
def test_a_file_name_that_is_not_utf8_is_written_escaped(tiny_checkpoint: str, tmp_path: Path) -> None:
    images = _digit_images(tmp_path / "images", 1)
    Image.new("L", (8, 8), 99).save(os.path.join(os.fsencode(images), b"caf\xff.png"), format="PNG")
    output = tmp_path / "predictions.csv"
    _predict(tiny_checkpoint, images, output)
    assert sorted(Path(r["path"]).name for r in _rows(output)) == ["0.png", "caf\\xff.png"]


def test_skip_corrupt_in_predict_leaves_the_files_out_and_lists_them(tiny_checkpoint: str, tmp_path: Path) -> None:
    images = _digit_images(tmp_path / "images", 5)
    for bad in ("2.png", "3.png"):  # with eval_batch_size 2, the batch [2.png, 3.png] is all corrupt
        (images / bad).write_bytes(b"truncated")
    output = tmp_path / "predictions.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _predict(tiny_checkpoint, images, output, "--data.init_args.skip_corrupt", "true",
                 "--data.init_args.eval_batch_size", "2")  # fmt: skip
    assert [Path(r["path"]).name for r in _rows(output)] == ["0.png", "1.png", "4.png"]
    (summary,) = [str(w.message) for w in caught if "have no prediction" in str(w.message)]
    assert summary.startswith("skip_corrupt: 2 undecodable image file(s)")
    assert str(images / "2.png") in summary and str(images / "3.png") in summary


@pytest.mark.parametrize("num_workers", [0, 2])
def test_predict_skips_corrupt_files_also_from_workers(tmp_path: Path, num_workers: int) -> None:
    root = write_image_folder(tmp_path / "data", per_class=1, size=8)
    predict = _digit_images(tmp_path / "predict", 4)
    (predict / "1.png").write_bytes(b"garbage")
    dm = ImageFolderDataModule(str(root), image_size=8, eval_batch_size=3, predict_dir=str(predict),
                               skip_corrupt=True, num_workers=num_workers)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.predict_dataloader())
    assert [Path(p).name for _, paths in batches for p in paths] == ["0.png", "2.png", "3.png"]
    assert [images.shape[0] for images, _ in batches] == [2, 1]
    assert dm.predict_skipped == [str(predict / "1.png")]
    with pytest.warns(UserWarning, match=r"1 undecodable image file\(s\) have no prediction: .*1\.png"):
        dm.teardown("predict")


# --- missing torchvision files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("module_cls", [CIFAR10DataModule, MNISTDataModule, FashionMNISTDataModule])
def test_missing_dataset_files_are_a_data_error_naming_the_folder(tmp_path: Path, module_cls: type) -> None:
    data_dir = tmp_path / "nothing here"
    with pytest.raises(DataConfigError) as info:
        module_cls(data_dir=str(data_dir)).splits()
    assert isinstance(info.value, ResNetLitError)
    assert str(data_dir) in str(info.value) and "download: true" in str(info.value)


def test_missing_cifar_through_the_cli_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", QUICKSTART, "--data", "resnet_lit.data.CIFAR10DataModule",
            "--data.data_dir", str(tmp_path / "cifar"), "--trainer.default_root_dir", str(tmp_path / "run"),
            *QUIET]  # fmt: skip
    message = _error_line(lambda: main(args), capsys)
    assert str(tmp_path / "cifar") in message and "download: true" in message


# --- a last training batch of one sample ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [DataLoaderBackend, DeviceBackend])
def test_a_last_training_batch_of_one_sample_is_dropped_on_every_rank(backend: type) -> None:
    splits = SyntheticDataModule(num_samples=17, image_size=4, num_val_samples=0, num_test_samples=0).splits()
    settings = LoaderSettings(batch_size=4, eval_batch_size=4, drop_last=False)
    pipeline = ImagePipeline("plain", None, None, (0.5,) * 3, (0.25,) * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rank0 = backend(settings, pipeline).train_loader(splits, Placement(seed=0, rank=0, world_size=2))
        rank1 = backend(settings, pipeline).train_loader(splits, Placement(seed=0, rank=1, world_size=2))
    for loader in (rank0, rank1):
        sizes = [len(batch[0]) for batch in loader]  # images, or the indices of an IndexBatch
        assert sizes == [4, 4] and len(loader) == 2
        assert loader.state_dict()["epoch"] == 1  # the epoch counts as finished: a resume starts the next one
    assert [str(w.message) for w in caught] == [  # once, from rank 0
        "drop_last: false would leave a last training batch of 1 sample (9 samples per process in batches of 4), "
        "which BatchNorm cannot train on: that batch is dropped every epoch"
    ]
    kept = LoaderSettings(batch_size=4, eval_batch_size=4, drop_last=False)
    with pytest.warns(UserWarning, match=r"\(17 samples per process"):  # 17 = 4 * 4 + 1 on one process
        assert len(backend(kept, pipeline).train_loader(splits, Placement(seed=0))) == 4
    assert len(backend(kept, pipeline).train_loader(splits, Placement(seed=0, world_size=3))) == 2  # 6 = 4 + 2


class _BatchNormNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(3 * 4 * 4), torch.nn.Linear(48, 10))
        self.batch_sizes: list[int] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_sizes.append(len(batch[0]))
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batchnorm_trains_with_drop_last_false_and_a_remainder_of_one() -> None:
    dm = SyntheticDataModule(num_samples=9, image_size=4, num_val_samples=0, batch_size=4, drop_last=False)
    model = _BatchNormNet()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", use_distributed_sampler=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning, match="BatchNorm cannot train on"):
        trainer.fit(model, datamodule=dm)
    assert model.batch_sizes == [4, 4, 4, 4]


# --- non-positive sizes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "key", "value"),
    [
        (lambda: ImageFolderDataModule("unused", image_size=0), "image_size", 0),
        (lambda: ImageFolderDataModule("unused", image_size=-32, transform_style="cifar"), "image_size", -32),
        (lambda: ImageFolderDataModule("unused", image_size=32, resize_size=0), "resize_size", 0),
        (lambda: CIFAR10DataModule(image_size=0), "image_size", 0),
        (lambda: MNISTDataModule(image_size=-1), "image_size", -1),
        (lambda: DigitsDataModule(image_size=0), "image_size", 0),
        (lambda: SyntheticDataModule(image_size=0), "image_size", 0),
        (lambda: SyntheticDataModule(num_samples=0), "num_samples", 0),
        (lambda: DigitsDataModule(batch_size=0), "batch_size", 0),
        (lambda: SyntheticDataModule(batch_size=-4), "batch_size", -4),
        (lambda: CIFAR10DataModule(eval_batch_size=0), "eval_batch_size", 0),
    ],
)
def test_non_positive_sizes_are_data_errors_at_construction(make, key: str, value: int) -> None:
    with pytest.raises(DataConfigError) as info:
        make()
    assert isinstance(info.value, ResNetLitError)
    assert str(info.value) == f"{key} must be a positive integer, got {value}"


@pytest.mark.parametrize("key", ["batch_size", "image_size"])
def test_non_positive_sizes_through_the_cli_are_one_line(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_line(lambda: main(["fit", "--config", QUICKSTART, f"--data.init_args.{key}", "0", *QUIET]), capsys)
    assert message == f"resnet-lit: error: {key} must be a positive integer, got 0"
