"""TrivialAugmentWide and RandAugment per image on whole batches (`resnet_lit/data/batch_augment.py`): each op equals
torchvision's at every magnitude and sign, the draws follow torchvision's distribution, every image draws its own,
the same seeds give the same batch on any device without a host sync, and `loader: device` trains with them and
resumes mid-epoch on exactly the uninterrupted batches."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from faultinject import Crash, CrashAtStep
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from batch_recorder import BatchRecorder
from fakedata import write_fake_cifar10
from resnet_lit.data import CIFAR10DataModule, DataConfigError
from resnet_lit.data import batch_augment as ba
from resnet_lit.data.backends import DeviceBackend
from resnet_lit.data.device_store import DeviceImageStore, SplitTensors
from resnet_lit.data.loaders import IndexBatch
from resnet_lit.data.seeds import sample_seeds
from threads import one_intra_op_thread

TORCHVISION = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}
# Geometric ops: the grid is built as torchvision builds it (the same float32 matrix, base grid and bmm), and here
# it agrees bit for bit (0 pixels differ). Another BLAS kernel could round a grid coordinate differently, and a
# sample point within that rounding of a pixel boundary would take the neighbouring pixel: allow 0.1% of them.
GEOMETRIC_MISMATCH = 0.001
CHI2_999 = {13: 34.53, 30: 59.70}  # chi-square quantile 0.999 by degrees of freedom: a wrong law fails, luck does not


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Small tensors: one thread is as fast, and on a busy machine much faster (see tests/threads.py)."""
    with one_intra_op_thread():
        yield


def _images(n: int, channels: int = 3, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Real-looking uint8 images: scikit-learn's digits upscaled, tinted per channel, on a ramp, with a little
    noise; the last one is a constant grey (AutoContrast's flat channels, Equalize's ``step == 0``)."""
    digits = pytest.importorskip("sklearn.datasets").load_digits().images[:n]
    strokes = torch.nn.functional.interpolate(
        torch.as_tensor(digits, dtype=torch.float32)[:, None] / 16, size=size, mode="bilinear", align_corners=False
    )
    generator = torch.Generator().manual_seed(0)
    tint = torch.rand(n, channels, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, size[1]) * torch.rand(n, channels, 1, 1, generator=generator)
    noise = torch.rand(n, channels, *size, generator=generator)
    images = (40 + 150 * strokes * tint + 60 * ramp + 8 * noise).round().clamp(0, 255).to(torch.uint8)
    images[-1] = 77
    return images


def _torchvision_op(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision.transforms.v2.functional's op with the parameters its TrivialAugmentWide/RandAugment pass."""
    nearest = v2.InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                         center=[0, 0])  # fmt: skip
    if op in ("TranslateX", "TranslateY"):
        translate = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    functions = {
        "Identity": lambda: image,
        "Rotate": lambda: TF.rotate(image, angle=magnitude, interpolation=nearest),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
    }
    return functions[op]()


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
@pytest.mark.parametrize(("channels", "size"), [(3, (32, 32)), (1, (28, 20))], ids=["rgb-32x32", "gray-28x20"])
def test_every_op_magnitude_and_sign_equals_torchvision(policy: str, channels: int, size: tuple[int, int]) -> None:
    """All 14 ops x 31 magnitude bins x 2 signs, mixed in one batch: colour ops exactly, geometric ones up to
    GEOMETRIC_MISMATCH. The magnitudes are torchvision's own table."""
    images = _images(4 if channels == 3 else 2, channels, size)
    space = TORCHVISION[policy]._AUGMENTATION_SPACE
    assert tuple(space) == ba.OPS
    combos = [(i, op, b, neg) for i in range(len(images)) for op in range(len(ba.OPS)) for b in range(ba.BINS)
              for neg in (False, True)]  # fmt: skip
    index, op, magnitude_bin, negative = (torch.tensor(column) for column in zip(*combos, strict=True))
    ours = ba.apply_ops(images[index], policy, op, magnitude_bin, negative)  # type: ignore[arg-type]
    mismatched: Counter[str] = Counter()
    for row, (i, o, b, neg) in enumerate(combos):
        name = ba.OPS[o]
        values, signed = space[name][0](ba.BINS, *size), space[name][1]
        magnitude = 0.0 if values is None else float(values[b])
        assert magnitude == (0.0 if values is None else ba.magnitudes(policy, name, *size)[b])  # type: ignore[index]
        expected = _torchvision_op(images[i], name, -magnitude if neg and signed else magnitude)
        mismatched[name] += int((ours[row] != expected).sum())
    pixels_per_op = len(images) * ba.BINS * 2 * images[0].numel()
    for name in ba.OPS:
        allowed = GEOMETRIC_MISMATCH * pixels_per_op if name in ba.GEOMETRIC else 0
        assert mismatched[name] <= allowed, f"{name}: {mismatched[name]} pixels differ from torchvision"


def test_the_images_of_a_batch_draw_their_own_op_and_magnitude() -> None:
    image = _images(2)[:1].expand(64, -1, -1, -1)
    seeds = sample_seeds(7, 0, torch.arange(64))
    op, magnitude_bin, negative = ba.trivial_augment_draws(seeds)
    assert len(set(op.tolist())) >= 12 and len(set(magnitude_bin.tolist())) >= 20 and 0 < negative.sum() < 64
    for out in (ba.trivial_augment(image, seeds), ba.rand_augment(image, seeds)):
        assert len({tuple(x.flatten().tolist()) for x in out}) >= 40


def test_the_draws_follow_torchvisions_law() -> None:
    """Ops and magnitude bins uniform (chi-square at the 0.999 quantile, fixed seeds), signs fair."""
    seeds = sample_seeds(0, 3, torch.arange(14_000))
    op, magnitude_bin, negative = ba.trivial_augment_draws(seeds)
    ops, negatives = ba.rand_augment_draws(seeds, 2)

    def chi2(draws: torch.Tensor, n: int) -> float:
        counts = torch.bincount(draws.flatten(), minlength=n).double()
        expected = draws.numel() / n
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(op, len(ba.OPS)) < CHI2_999[13] and chi2(magnitude_bin, ba.BINS) < CHI2_999[30]
    assert chi2(ops[:, 0], len(ba.OPS)) < CHI2_999[13] and chi2(ops[:, 1], len(ba.OPS)) < CHI2_999[13]
    for signs in (negative, negatives):
        assert abs(signs.double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(signs.numel())  # 4 standard errors


def _pixel_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean and std of its pixels and its share of black pixels (the fill of geometric ops)."""
    flat = images.flatten(1).double()
    return torch.stack([flat.mean(1), flat.std(1), (flat == 0).double().mean(1)], dim=1)


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_outputs_are_distributed_as_torchvisions(policy: str) -> None:
    """2000 augmentations of 8 images each way: the mean and the spread of each pixel statistic agree within 4
    standard errors (fixed seeds: deterministic; measured |z| <= 2.3 here, also with 10x the draws)."""
    images = _images(8).repeat(250, 1, 1, 1)
    ours = _pixel_statistics(ba.batch_augment(policy, images, sample_seeds(1, 0, torch.arange(len(images)))))
    torch.manual_seed(0)
    transform = TORCHVISION[policy]()
    theirs = _pixel_statistics(torch.stack([transform(image) for image in images]))
    for k, name in enumerate(("mean", "std", "black share")):
        a, b = ours[:, k], theirs[:, k]
        mean_error = math.sqrt((a.var() + b.var()).item() / len(a))
        assert abs(a.mean() - b.mean()).item() < 4 * mean_error, name
        spread_error = math.hypot(_std_error(a), _std_error(b))
        assert abs(a.std() - b.std()).item() < 4 * spread_error, name


def _std_error(sample: torch.Tensor) -> float:
    """The standard error of a sample's std: sqrt(var (kurtosis - 1) / 4n); these statistics are far from normal
    (mostly zero black share, for one), so the normal sqrt(var / 2n) would understate it."""
    centred = sample - sample.mean()
    variance = centred.pow(2).mean()
    kurtosis = centred.pow(4).mean() / variance**2
    return math.sqrt(variance * (kurtosis - 1) / (4 * len(sample)))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seeds_same_batch_anywhere_other_seeds_other_batches(device: str) -> None:
    """A sample is augmented the same in any batch (its seed alone decides); on CUDA without a host sync."""
    images = _images(8).to(device)
    seeds = sample_seeds(5, 2, torch.arange(8, device=device))
    pick = torch.tensor([6, 2, 5], device=device)
    for policy in ("trivialaugment", "randaugment"):
        first = ba.batch_augment(policy, images, seeds)  # builds the per-device tables
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            again = ba.batch_augment(policy, images, seeds)
            reordered = ba.batch_augment(policy, images[pick], seeds[pick])
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert first.dtype == torch.uint8 and first.shape == images.shape and first.device == images.device
        assert torch.equal(first, again) and torch.equal(reordered, first[pick])
        other = ba.batch_augment(policy, images, sample_seeds(5, 3, torch.arange(8, device=device)))
        assert (other != first).flatten(1).any(1).sum() >= 5
        if device == "cuda":  # the same images as on the CPU, but for float rounding at a pixel boundary
            on_cpu = ba.batch_augment(policy, images.cpu(), seeds.cpu())
            assert (first.cpu() != on_cpu).double().mean() <= GEOMETRIC_MISMATCH


class _OffDevice(TorchDispatchMode):
    """Records every op that touches a tensor outside the meta device (a per-batch host-to-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type != "meta" for t in tensors):
            self.ops.append(str(func))
        return out


def test_no_host_sync_and_no_host_copy_per_batch() -> None:
    """Meta tensors have no values: reading one (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, the calls that
    tests/sync_audit.py records) or an op whose output shape depends on values (``nonzero``, boolean-mask
    indexing) raises. So a batch augmented on the meta device never waits for a GPU either. After the first batch
    (which builds the per-device tables), no op touches a host tensor: no per-batch copy to the device."""
    meta = torch.device("meta")
    images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device=meta)
    seeds = torch.empty(16, dtype=torch.int64, device=meta)
    store = DeviceImageStore(
        {"train": lambda: SplitTensors(_images(16).permute(0, 2, 3, 1).contiguous(), torch.arange(16))},
        mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True, random_erasing=0.25, augment="trivialaugment",
    )  # fmt: skip
    batch = IndexBatch(torch.empty(8, dtype=torch.int64, device=meta), "train", epoch=1, seed=3)

    def run() -> None:
        for policy in ("trivialaugment", "randaugment"):
            assert ba.batch_augment(policy, images, seeds).device == meta
        normalized, targets = store.materialize(batch)
        assert normalized.shape == (8, 3, 32, 32) and normalized.device == targets.device == meta

    run()
    with _OffDevice() as watch:
        run()
    assert watch.ops == []


def test_device_store_augments_train_batches_after_crop_flip_and_before_normalisation() -> None:
    """torchvision's order, each step seeded by the sample: crop + flip, augment, normalise, erase; eval untouched.
    Float images (synthetic, digits) are rounded to 8 bits for the augmentation."""
    images = _images(12)
    tensors = SplitTensors(images.permute(0, 2, 3, 1).contiguous(), torch.arange(12))
    for stored in (tensors, SplitTensors(tensors.images.float() / 255, tensors.targets)):
        splits = {"train": lambda s=stored: s, "val": lambda s=stored: SplitTensors(s.images, s.targets)}
        store = DeviceImageStore(splits, mean=(0.0,) * 3, std=(1.0,) * 3, crop_padding=4, flip=True,
                                 augment="randaugment")  # fmt: skip
        indices = torch.tensor([3, 0, 11, 7])
        batch = IndexBatch(indices, "train", epoch=2, seed=9)
        seeds = sample_seeds(9, 2, indices)
        padded = store.split("train", torch.device("cpu")).images
        cropped = store._augmented(padded, indices, seeds).permute(0, 3, 1, 2)
        if cropped.is_floating_point():
            cropped = (cropped * 255).round().to(torch.uint8)
        augmented = ba.rand_augment(cropped, seeds)
        assert torch.equal(store.materialize(batch)[0], store.normalize(augmented))
        assert not torch.equal(augmented, cropped)
        evaluated = store.materialize(IndexBatch(indices, "val"))[0]
        assert torch.allclose(evaluated, images[indices].float() / 255)


def test_images_of_other_channel_counts_are_a_config_error() -> None:
    with pytest.raises(DataConfigError, match="1 or 3 channels, got 2"):
        ba.trivial_augment(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), torch.arange(2))


# --- loader: device trains with augment and resumes mid-epoch --------------------------------------------------------





def _fit(data: Path, root: Path, crash_at: int | None = None, ckpt_path: str | None = None) -> BatchRecorder:
    dm = CIFAR10DataModule(data_dir=str(data), batch_size=8, seed=3, loader="device", augment="trivialaugment",
                           random_erasing=0.25)  # fmt: skip
    model = BatchRecorder(3 * 32 * 32)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", use_distributed_sampler=False, limit_val_batches=0, logger=False,
        callbacks=[ModelCheckpoint(root, save_last=True, every_n_train_steps=1),
                   *([CrashAtStep(crash_at)] if crash_at is not None else [])],
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with contextlib.suppress(Crash):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert isinstance(dm.backend, DeviceBackend) and dm.backend.store(dm.splits()).augment == "trivialaugment"
    return model


def test_device_path_with_trivialaugment_and_erasing_trains_and_resumes_mid_epoch_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar10(tmp_path / "data", monkeypatch, per_batch=13, num_test=4)  # 65 images: 8 batches of 8
    uninterrupted = _fit(tmp_path / "data", tmp_path / "full")
    assert sorted(uninterrupted.seen) == list(range(16)) and all(math.isfinite(v) for v in uninterrupted.losses)
    folder = tmp_path / "run"
    _fit(tmp_path / "data", folder, crash_at=11)
    resumed = _fit(tmp_path / "data", folder, ckpt_path=str(folder / "last.ckpt"))
    assert sorted(resumed.seen) == list(range(11, 16))
    for step, (x, y) in resumed.seen.items():
        assert torch.equal(x, uninterrupted.seen[step][0]) and torch.equal(y, uninterrupted.seen[step][1]), step
