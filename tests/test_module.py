"""ResNetClassifier and its optimizer helpers: the behaviour recipes rely on."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lit import NetworkConfig, ResNetClassifier
from resnet_lit.cli import ResNetLitCLI
from resnet_lit.optim import WarmupCosineLR, param_groups

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_norm_and_bias_parameters_are_exempt_from_weight_decay_only_when_asked() -> None:
    model = ResNetClassifier(arch="resnet20", num_classes=10).net
    assert len(param_groups(model, False)) == 1
    decay, no_decay = param_groups(model, True)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert {id(p) for p in no_decay["params"]} == norms | biases
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert {id(p) for p in decay["params"]} == convs
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_weight_decay_exemption_reaches_the_optimizer() -> None:
    module = ResNetClassifier(
        arch="resnet20",
        no_weight_decay_on_norm_and_bias=True,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=5e-4),
    )
    optimizer = module.configure_optimizers()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_warmup_cosine_schedule_shape() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=10, warmup_start_factor=0.0, min_lr_ratio=0.1)
    scheduler.set_total_steps(110)
    lrs = []
    for _ in range(111):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_warmup_fraction_is_relative_to_the_run_length() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=0.1, warmup_start_factor=0.0)
    scheduler.set_total_steps(200)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    state = scheduler.state_dict()
    assert state["total_steps"] == 200 and state["warmup_steps"] == 0.1


def _mixed_training_step(
    module: ResNetClassifier, images: torch.Tensor, targets: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step: its loss, and the images the network and the targets the loss were given."""
    seen = {}
    forward, cross_entropy = module.forward, F.cross_entropy

    def network(x: torch.Tensor) -> torch.Tensor:
        seen["images"] = x.detach().clone()
        return forward(x)

    def loss(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        seen["targets"] = target.detach().clone()
        return cross_entropy(logits, target, **kwargs)

    monkeypatch.setattr(module, "forward", network)
    monkeypatch.setattr(F, "cross_entropy", loss)
    return module.training_step((images, targets), 0), seen["images"], seen["targets"]


def _mixup_weight(images: torch.Tensor, labels: torch.Tensor, mixed: torch.Tensor, soft: torch.Tensor) -> float | None:
    """``lam`` if every image is ``lam * own + (1 - lam) * previous`` with the same soft target; else None."""
    lam = soft[0, labels[0]].item()
    expected = lam * F.one_hot(labels, 10) + (1 - lam) * F.one_hot(labels.roll(1, 0), 10)
    if not torch.allclose(soft, expected.float(), atol=1e-6):
        return None
    return lam if torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5) else None


def _cutmix_share(images: torch.Tensor, labels: torch.Tensor, mixed: torch.Tensor, soft: torch.Tensor) -> float | None:
    """The share of pixels pasted from the previous image if they form one rectangle, the same for every image,
    matching the soft target's weight of the previous label; else None."""
    pasted = (mixed != images).any(dim=1)  # [B, H, W]
    box = pasted[0]
    rows, cols = box.any(dim=1), box.any(dim=0)
    if not torch.equal(box, rows[:, None] & cols[None, :]) or not all(torch.equal(p, box) for p in pasted):
        return None
    if not torch.equal(mixed[:, :, box], images.roll(1, 0)[:, :, box]):
        return None
    share = box.float().mean().item()
    expected = (1 - share) * F.one_hot(labels, 10) + share * F.one_hot(labels.roll(1, 0), 10)
    return share if torch.allclose(soft, expected.float(), atol=1e-6) else None


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_mix_images_and_train_on_soft_targets(
    mixup: float, cutmix: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network sees mixed images and the loss gets the soft targets of the same mix, for every recipe."""
    module = ResNetClassifier(arch="resnet20", num_classes=10, mixup_alpha=mixup, cutmix_alpha=cutmix)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    kinds = set()
    for seed in range(6):
        torch.manual_seed(seed)
        loss, mixed, soft = _mixed_training_step(module, images, labels, monkeypatch)
        assert soft.shape == (8, 10) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
        assert not torch.equal(mixed, images) and (soft < 1).all()  # mixed images, soft targets
        lam, share = _mixup_weight(images, labels, mixed, soft), _cutmix_share(images, labels, mixed, soft)
        assert (lam is not None) != (share is not None), "neither (or both) a mixup nor a cutmix of the batch"
        assert 0 < (lam if lam is not None else share) < 1
        kinds.add("mixup" if lam is not None else "cutmix")
        assert torch.isfinite(loss)
        loss.backward()
    assert kinds == {name for name, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0}


def test_without_mixup_and_cutmix_the_batch_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    module = ResNetClassifier(arch="resnet20", num_classes=10)
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    _, seen_images, seen_targets = _mixed_training_step(module, images, labels, monkeypatch)
    assert torch.equal(seen_images, images) and torch.equal(seen_targets, labels)


def test_label_smoothing_reaches_the_training_loss() -> None:
    torch.manual_seed(0)
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    smooth = ResNetClassifier(arch="resnet20", label_smoothing=0.2)
    loss = smooth.training_step((images, targets), 0)
    logits = smooth(images)  # train mode: BatchNorm uses batch statistics, so the same logits again
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.2).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-3)


def test_top5_is_skipped_below_five_classes() -> None:
    assert "acc_top5" not in ResNetClassifier(arch="resnet20", num_classes=3).val_metrics
    assert "acc_top5" in ResNetClassifier(arch="resnet20", num_classes=5).val_metrics


def test_metric_collections_log_the_established_names() -> None:
    module = ResNetClassifier(arch="resnet20", num_classes=10)
    assert list(module.train_metrics.keys()) == ["train/acc"]  # train/loss is logged per step, not as a metric
    assert set(module.val_metrics.keys()) == {"val/loss", "val/acc", "val/acc_macro", "val/acc_top5"}
    assert set(module.test_metrics.keys()) == {"test/loss", "test/acc", "test/acc_macro", "test/acc_top5"}
    logits, targets = torch.randn(6, 10), torch.arange(6)
    module.val_metrics.update(logits, targets)
    values = module.val_metrics.compute()
    assert values["val/loss"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert values["val/acc"].item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert module.test_metrics["acc"].update_count == 0  # the stages hold separate states


def test_predict_step_returns_topk_names_and_probabilities() -> None:
    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    module = ResNetClassifier(arch="resnet20", num_classes=6, class_names=names, predict_top_k=3).eval()
    out = module.predict_step((torch.randn(2, 3, 32, 32), ["a.png", "b.png"]), 0)
    assert out["keys"] == ["a.png", "b.png"]
    assert out["classes"].shape == out["probs"].shape == (2, 3)
    assert torch.all(out["probs"][:, :-1] >= out["probs"][:, 1:])
    assert out["class_names"][0][0] == names[out["classes"][0, 0]]
    images = torch.randn(2, 3, 32, 32)
    out = module.predict_step((images, ["a.png", "b.png"]), 0)
    expected_probs, expected_classes = module(images).softmax(dim=1).topk(3, dim=1)
    assert torch.equal(out["classes"], expected_classes)  # the top-3 classes of the network, with their softmax
    torch.testing.assert_close(out["probs"], expected_probs.detach())
    assert out["class_names"] == [[names[i] for i in row] for row in expected_classes.tolist()]


def test_network_config_overrides_reach_the_network() -> None:
    module = ResNetClassifier(arch="resnet20", net=NetworkConfig(stem="deep", shortcut="conv_bn", drop_path=0.1))
    assert type(module.net.stem[0]) is nn.Conv2d and module.net.stem.stride == 4
    assert module.hparams.net == {"stem": "deep", "shortcut": "conv_bn", "drop_path": 0.1}


def test_channels_last_is_the_default_memory_format() -> None:
    module = ResNetClassifier(arch="resnet20")
    assert module.net.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_yaml_swaps_blocks_per_stage_and_user_block_by_class_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "userblocks.py").write_text(
        "import resnet_lit\n"
        "class Tiny(resnet_lit.BasicBlock):\n"
        "    '''A user block defined outside the package.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = ResNetLitCLI(
        args=["--config", QUICKSTART, "--model.net.block", "[basic, userblocks.Tiny, se_basic]",
              "--model.net.stem", "cifar", *QUIET],
        run=False,
    )  # fmt: skip
    stage_blocks = [type(stage[0]).__name__ for stage in cli.model.net.stages]
    assert stage_blocks == ["BasicBlock", "Tiny", "SEBasicBlock"]
    assert cli.model.hparams.in_channels == 1 and cli.model.hparams.num_classes == 10


def test_tensorboard_logger_when_configured(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    ResNetLitCLI(
        args=["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
              "--trainer.logger.save_dir", str(tmp_path / "tb"),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
              *QUIET],
    )  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"train/loss", "train/acc"} <= set(accumulator.Tags()["scalars"])  # the metrics reach TensorBoard
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
